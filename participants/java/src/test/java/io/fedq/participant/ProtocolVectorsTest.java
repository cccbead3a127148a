package io.fedq.participant;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import org.junit.Test;

/** The protocol-vector blocks of docs/protocol.md: feature encoding, tensors, local training. */
public class ProtocolVectorsTest {
    static final ObjectMapper JSON = new ObjectMapper();

    static Spec spec() throws Exception {
        return Spec.parse(Docs.block("protocol.md", "json protocol-vector:spec"), "protocol-vector:spec");
    }

    static Features rows(Spec s) throws Exception {
        return Features.encode(Table.parse(Docs.block("protocol.md", "csv protocol-vector:rows")), s);
    }

    @Test
    public void encodingMatchesTheVectorBitForBit() throws Exception {
        Spec s = spec();
        assertEquals(5, s.inputDim());
        Features f = rows(s);
        JsonNode want = JSON.readTree(Docs.block("protocol.md", "json protocol-vector:encoded"));
        assertEquals(want.get("x_bits").size(), f.rows());
        for (int r = 0; r < f.rows(); r++) {
            for (int c = 0; c < 5; c++) {
                String bits = want.get("x_bits").get(r).get(c).asText();
                assertEquals("row " + r + " slot " + c, bits, String.format("%08x", Float.floatToRawIntBits(f.x[r][c])));
                assertEquals((float) want.get("x").get(r).get(c).asDouble(), f.x[r][c], 0f);
            }
            assertEquals((float) want.get("y").get(r).asDouble(), f.y[r], 0f);
        }
    }

    @Test
    public void tensorsAreNamedAndShapedAsTheVector() throws Exception {
        JsonNode cases = JSON.readTree(Docs.block("protocol.md", "json protocol-vector:tensors"));
        for (JsonNode c : cases) {
            JsonNode m = c.get("model");
            int[] hidden = new int[m.path("hidden").size()];
            for (int i = 0; i < hidden.length; i++) {
                hidden[i] = m.get("hidden").get(i).asInt();
            }
            Net net = new Net(5, hidden, m.path("activation").asText("relu").equals("tanh"), m.path("dropout").asDouble(0));
            JsonNode want = c.get("tensors");
            assertEquals(want.size(), net.names.size());
            for (int i = 0; i < want.size(); i++) {
                assertEquals(want.get(i).get(0).asText(), net.names.get(i));
                JsonNode sh = want.get(i).get(1);
                long[] shape = new long[sh.size()];
                for (int j = 0; j < shape.length; j++) {
                    shape[j] = sh.get(j).asLong();
                }
                assertArrayEquals(shape, net.shapes.get(i));
            }
        }
    }

    @Test
    public void fullBatchTrainingMatchesTheDeltaVector() throws Exception {
        Spec s = spec();
        Features f = rows(s);
        JsonNode v = JSON.readTree(Docs.block("protocol.md", "json protocol-vector:delta"));
        double tol = v.get("tolerance").asDouble();
        Net net = new Net(s);
        List<Tensor> received = new ArrayList<>();
        for (int i = 0; i < net.names.size(); i++) {
            received.add(new Tensor(net.names.get(i), net.shapes.get(i), flat(v.get("received").get(net.names.get(i)))));
        }
        int cases = 0;
        for (JsonNode c : v.get("cases")) {
            JsonNode t = c.get("training");
            Net.Settings st = new Net.Settings();
            st.epochs = t.get("epochs").asInt();
            st.batchSize = t.get("batch_size").asInt();
            st.lr = t.get("lr").asDouble();
            st.positiveWeight = t.get("positive_weight").asDouble();
            st.proxMu = t.get("prox_mu").asDouble();
            Net.Result r = net.train(received, f, st, new Random(0));
            for (Tensor d : r.delta) {
                float[] want = flat(c.get("delta").get(d.name));
                for (int j = 0; j < want.length; j++) {
                    assertEquals(d.name + "[" + j + "]", want[j], d.data[j], tol);
                }
            }
            assertEquals(c.get("train_loss").asDouble(), r.trainLoss, tol);
            // another row order changes nothing in full-batch training (to rounding)
            Net.Result again = net.train(received, f, st, new Random(12345));
            assertEquals(r.trainLoss, again.trainLoss, 1e-12);
            cases++;
        }
        assertTrue(cases >= 2);
    }

    static float[] flat(JsonNode n) {
        List<Float> out = new ArrayList<>();
        addAll(n, out);
        float[] f = new float[out.size()];
        for (int i = 0; i < f.length; i++) {
            f[i] = out.get(i);
        }
        return f;
    }

    private static void addAll(JsonNode n, List<Float> out) {
        if (n.isArray()) {
            for (JsonNode x : n) {
                addAll(x, out);
            }
        } else {
            out.add((float) n.asDouble());
        }
    }
}
