package io.fedq.participant;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.security.PrivateKey;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/** The test vectors of docs/wire-format.md: worked example, codecs, signatures. */
public class WireVectorsTest {
    /** The one-line hex of section 13's worked example. */
    static byte[] workedExample() {
        for (String b : Docs.blocks("wire-format.md", "")) {
            String t = b.trim();
            if (t.matches("[0-9a-f]+") && t.startsWith("8b")) {
                return Bin.unhex(t);
            }
        }
        throw new AssertionError("no worked example hex in docs/wire-format.md");
    }

    static byte[] exampleHash() {
        for (String b : Docs.blocks("wire-format.md", "")) {
            if (b.contains("fedq-tensors-v1\\0")) {
                for (String line : b.split("\n")) {
                    if (line.startsWith("h = ")) {
                        return Bin.unhex(line.substring(4));
                    }
                }
            }
        }
        throw new AssertionError("no content hash preimage block in docs/wire-format.md");
    }

    static byte[] exampleVersionHash() {
        for (String b : Docs.blocks("wire-format.md", "")) {
            if (b.startsWith("lineage bytes (61)")) {
                return Bin.unhex(Docs.after(b, "version hash"));
            }
        }
        throw new AssertionError("no lineage vector in docs/wire-format.md");
    }

    static Tensor exampleTensor() {
        return new Tensor("w", new long[] {2}, new float[] {1.0f, -2.0f});
    }

    @Test
    public void workedExampleEncodesByteForByte() {
        List<Tensor> ts = List.of(exampleTensor());
        byte[] h = Wire.contentHash(ts);
        assertArrayEquals(exampleHash(), h);
        Wire.Update u = new Wire.Update();
        u.task = "credit";
        u.participant = "bank-a";
        u.id = "u-0001";
        u.baseVersion = 3;
        u.samples = 100;
        u.codec = "raw";
        u.tensors = ts;
        u.payloads = List.of(Bin.floatsLE(ts.get(0).data));
        u.hash = h;
        assertEquals(Bin.hex(workedExample()), Bin.hex(Wire.encodeUpdate(u)));
    }

    @Test
    public void aModelEnvelopeDecodesAndIsChecked() throws Exception {
        // The worked example's fields as a model envelope, written with msgpack-java.
        byte[] body = modelEnvelope("raw", Bin.floatsLE(new float[] {1.0f, -2.0f}), exampleHash());
        Wire.Model m = Wire.decodeModel(body, List.of("w"), List.of(new long[] {2}));
        assertEquals(4, m.version);
        assertArrayEquals(new float[] {1.0f, -2.0f}, m.tensors.get(0).data, 0f);
        byte[] z = com.github.luben.zstd.Zstd.compress(Bin.floatsLE(new float[] {1.0f, -2.0f}));
        assertEquals(4, Wire.decodeModel(modelEnvelope("zstd", z, exampleHash()), List.of("w"), List.of(new long[] {2})).version);
        expect("hash_mismatch", modelEnvelope("raw", Bin.floatsLE(new float[] {1.0f, -3.0f}), exampleHash()), 2);
        expect("tensor_mismatch", body, 3);
        expect("unknown_codec", modelEnvelope("int8", new byte[0], exampleHash()), 2);
        expect("size_mismatch", modelEnvelope("raw", new byte[4], exampleHash()), 2);
        expect("malformed", Arrays.copyOf(body, body.length + 1), 2);
        expect("wrong_kind", workedExample(), 2);
    }

    static void expect(String reason, byte[] body, long dim) {
        try {
            Wire.decodeModel(body, List.of("w"), List.of(new long[] {dim}));
            fail("decoded; expected " + reason);
        } catch (WireException e) {
            assertEquals(e.getMessage(), reason, e.reason);
        }
    }

    static byte[] modelEnvelope(String codec, byte[] payload, byte[] h) throws Exception {
        try (org.msgpack.core.MessageBufferPacker pk = org.msgpack.core.MessagePack.newDefaultBufferPacker()) {
            pk.packMapHeader(7);
            pk.packString("fv").packInt(1);
            pk.packString("k").packString("m");
            pk.packString("t").packString("credit");
            pk.packString("v").packInt(4);
            pk.packString("c").packString(codec);
            pk.packString("ts").packArrayHeader(1).packMapHeader(4);
            pk.packString("n").packString("w").packString("d").packString("f32");
            pk.packString("s").packArrayHeader(1).packInt(2);
            pk.packString("b").packBinaryHeader(payload.length).writePayload(payload);
            pk.packString("h").packBinaryHeader(32).writePayload(h);
            return pk.toByteArray();
        }
    }

    // ------------------------------------------------------------------ codecs

    static final float[] W = {0.5f, -1.25f, 3.0f, 0.001f, -0.0f, 7.5f};
    static final long[] W_SHAPE = {2, 3};

    static float[] v300() {
        float[] v = new float[300];
        v[0] = 1.0f;
        v[200] = -2.0f;
        v[299] = 0.5f;
        return v;
    }

    static byte[] hashOf(String name, long[] shape, float[] data) {
        return Wire.contentHash(List.of(new Tensor(name, shape, data)));
    }

    @Test
    public void codecVectorsMatchFedqsEncoder() throws Exception {
        String block = Docs.block("wire-format.md", "codec-vector");
        assertEquals(Docs.value(block, "w raw hash"), Bin.hex(hashOf("w", W_SHAPE, W)));
        int checked = 0;
        for (String codec : Codecs.LOSSY) {
            double fraction = codec.startsWith("topk") ? 0.5 : 0.0;
            Codecs.Encoded e = Codecs.encode(codec, W, W_SHAPE, fraction, null);
            assertEquals(codec + " payload", Docs.value(block, "w " + codec + " payload"), Bin.hex(e.payload));
            assertEquals(codec + " hash", Docs.value(block, "w " + codec + " hash"), Bin.hex(hashOf("w", W_SHAPE, e.decoded)));
            String[] dec = Docs.value(block, "w " + codec + " decoded").split(" ");
            float[] back = Codecs.decode(codec, e.payload, W_SHAPE);
            for (int i = 0; i < dec.length; i++) {
                assertEquals(codec + " decoded " + i, Float.floatToRawIntBits((float) Double.parseDouble(dec[i])),
                        Float.floatToRawIntBits(e.decoded[i]));
                assertEquals(Float.floatToRawIntBits(e.decoded[i]), Float.floatToRawIntBits(back[i]));
            }
            // the +zstd form decodes to the same values
            Codecs.Encoded z = Codecs.encode(codec + "+zstd", W, W_SHAPE, fraction, null);
            assertArrayEquals(e.decoded, Codecs.decode(codec + "+zstd", z.payload, W_SHAPE), 0f);
            checked++;
        }
        for (String codec : List.of("topk", "topk8")) {
            Codecs.Encoded e = Codecs.encode(codec, v300(), new long[] {300}, 0.01, null);
            assertEquals(Docs.value(block, "v " + codec + " payload"), Bin.hex(e.payload));
            assertEquals(Docs.value(block, "v " + codec + " hash"), Bin.hex(hashOf("v", new long[] {300}, e.decoded)));
            assertArrayEquals(e.decoded, Codecs.decode(codec, e.payload, new long[] {300}), 0f);
        }
        String[] at = Docs.value(block, "v topk8 decoded at 0, 200, 299").split(" ");
        Codecs.Encoded e = Codecs.encode("topk8", v300(), new long[] {300}, 0.01, null);
        assertEquals((float) Double.parseDouble(at[0]), e.decoded[0], 0f);
        assertEquals((float) Double.parseDouble(at[1]), e.decoded[200], 0f);
        assertEquals((float) Double.parseDouble(at[2]), e.decoded[299], 0f);
        assertEquals(6, checked);
    }

    @Test
    public void lossyDecodersRefuseBadPayloads() {
        String[][] cases = {
            {"int8", "0000c0ff" + "000000000000", "codec_error"},   // NaN scale
            {"int8", "0000803f" + "800000000000", "codec_error"},   // a q of -128
            {"int8", "0000803f00", "size_mismatch"},
            {"topk", "07000000", "codec_error"},                    // k > n
            {"topk", "010000000000803f", "codec_error"},            // no varint
            {"topk", "010000000000803f8000", "codec_error"},        // not the shortest form
            {"topk", "010000000000803f06", "codec_error"},          // index out of range
        };
        for (String[] c : cases) {
            try {
                Codecs.decode(c[0], Bin.unhex(c[1]), W_SHAPE);
                fail(c[0] + " " + c[1] + " decoded");
            } catch (WireException e) {
                assertEquals(c[1], c[2], e.reason);
            }
        }
    }

    @Test
    public void halfFloatRounding() {
        assertEquals(0x3c00, Codecs.floatToHalf(1.0f));
        assertEquals(0x7bff, Codecs.floatToHalf(65504f));
        assertEquals(0x0001, Codecs.floatToHalf((float) Math.pow(2, -24)));
        assertEquals(0x0000, Codecs.floatToHalf((float) Math.pow(2, -25))); // a tie, to even
        assertEquals(0x3c00, Codecs.floatToHalf(1.0f + (float) Math.pow(2, -11))); // a tie, to even
        assertEquals(0x3c01, Codecs.floatToHalf(1.0f + 3 * (float) Math.pow(2, -12)));
        for (int h = 0; h < 0x7c00; h++) {
            assertEquals(h, Codecs.floatToHalf(Codecs.halfToFloat(h)));
        }
    }

    // --------------------------------------------------------------- signatures

    static PrivateKey docKey() throws Exception {
        byte[] seed = new byte[32];
        for (int i = 0; i < 32; i++) {
            seed[i] = (byte) i;
        }
        return Signing.privateFromSeed(seed);
    }

    static byte[] filled(int b) {
        byte[] out = new byte[32];
        Arrays.fill(out, (byte) b);
        return out;
    }

    @Test
    public void signingVectorsMatch() throws Exception {
        String block = Docs.block("wire-format.md", "signing-vector");
        PrivateKey key = docKey();
        byte[] pub = Signing.rawPublic(Docs.value(block, "public key"));
        assertTrue(Signing.matches(key, pub));
        assertFalse(Signing.matches(docKeyOther(), pub));
        assertEquals(Docs.value(block, "fingerprint"), Signing.fingerprint(pub));
        Map<String, Double> metrics = new LinkedHashMap<>();
        metrics.put("loss", 0.5);
        metrics.put("auc", 0.75);
        assertEquals(Docs.value(block, "metrics digest"), Bin.hex(Wire.metricsDigest(metrics)));
        assertEquals(Docs.value(block, "empty metrics digest"), Bin.hex(Wire.metricsDigest(Map.of())));

        byte[] h = exampleHash();
        byte[] sh = filled(0x33);
        byte[] update = Wire.updateSigningMessage("credit", "bank-a", "u-0001", 3, 100, h, sh, metrics);
        assertEquals(Docs.after(block, "update (task credit"), Bin.hex(update));
        assertEquals(Docs.value(block, "update signature"), Bin.hex(Signing.sign(key, update)));

        byte[] model = Wire.modelSigningMessage("credit", 4, exampleVersionHash(), h, sh, List.of(filled(0x11)));
        assertEquals(Docs.after(block, "model (task credit"), Bin.hex(model));
        byte[] modelSig = Bin.unhex(Docs.value(block, "model signature"));
        assertEquals(Bin.hex(modelSig), Bin.hex(Signing.sign(key, model)));
        assertTrue(Signing.verify(pub, model, modelSig));
        byte[] tampered = model.clone();
        tampered[tampered.length - 1] ^= 1;
        assertFalse(Signing.verify(pub, tampered, modelSig));

        byte[] receipt = Wire.receiptSigningMessage("credit", "bank-a", "u-0001", "accepted", 4, 0.25, "");
        assertEquals(Docs.after(block, "receipt (accepted"), Bin.hex(receipt));
        assertEquals(Docs.value(block, "receipt signature"), Bin.hex(Signing.sign(key, receipt)));
    }

    static PrivateKey docKeyOther() throws Exception {
        return Signing.privateFromSeed(filled(7));
    }

    @Test
    public void receiptsDecodeAndRefuseExtraFields() throws Exception {
        byte[] ok = receipt(true, false);
        Wire.Receipt r = Wire.decodeReceipt(ok);
        assertEquals("accepted", r.outcome);
        assertEquals(4, r.version);
        assertEquals(0.25, r.weight, 0);
        assertNotNull(r.signature);
        try {
            Wire.decodeReceipt(receipt(true, true));
            fail("an accepted receipt with r decoded");
        } catch (WireException e) {
            assertEquals("unknown_field", e.reason);
        }
        assertEquals("r", Wire.peekKind(ok));
    }

    static byte[] receipt(boolean accepted, boolean extra) throws Exception {
        try (org.msgpack.core.MessageBufferPacker pk = org.msgpack.core.MessagePack.newDefaultBufferPacker()) {
            pk.packMapHeader(10 + (extra ? 1 : 0));
            pk.packString("fv").packInt(1).packString("k").packString("r").packString("t").packString("credit");
            pk.packString("p").packString("bank-a").packString("id").packString("u-0001");
            pk.packString("o").packString(accepted ? "accepted" : "refused");
            pk.packString("v").packInt(4).packString("w").packDouble(0.25);
            if (extra) {
                pk.packString("r").packString("x");
            }
            pk.packString("at").packDouble(1.5);
            pk.packString("sg").packBinaryHeader(64).writePayload(new byte[64]);
            return pk.toByteArray();
        }
    }
}
