package io.fedq.participant;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The task spec as a participant reads it (docs/protocol.md section 4), from the JSON file
 * {@code fedq task init} writes. The spec hash is SHA-256 of that file less its final newline
 * (docs/wire-format.md section 15): this client does not re-create the canonical form.
 */
public final class Spec {
    public String taskId;
    public String modelKind = "logreg";
    public int[] hidden = new int[0];
    public String activation = "relu";
    public double dropout = 0.0;
    public final List<Feature> features = new ArrayList<>();
    public String targetName;
    public String targetPositive;
    public String mode = "async";
    public int epochs = 1;
    public int batchSize = 32;
    public double lr = 0.05;
    public double proxMu = 0.0;
    public double positiveWeight = 1.0;
    public final List<String> participants = new ArrayList<>();
    public long maxSamples = 1_000_000L;
    public final Map<String, Long> declaredSamples = new LinkedHashMap<>();
    public boolean requireSignatures = false;
    public String aggregatorKey;
    public final Map<String, String> participantKeys = new LinkedHashMap<>();
    public boolean secureAggregation = false;
    public boolean bankPrivacy = false;
    /** The lossy codec of section 6.1 (null: none), and its options. */
    public String compression;
    public String compressionLossless;
    public boolean stochasticRounding = false;
    public double topkFraction = 0.0;
    public boolean errorFeedback = true;
    public byte[] specHash;

    /** One feature of the fixed schema (docs/protocol.md section 5.2). */
    public static final class Feature {
        public String name;
        public boolean numeric;
        public double mean;
        public double std;
        public Double fill;
        public List<String> vocabulary = new ArrayList<>();

        public int slots() {
            return numeric ? 1 : vocabulary.size() + 1;
        }
    }

    public int inputDim() {
        int d = 0;
        for (Feature f : features) {
            d += f.slots();
        }
        return d;
    }

    public static Spec load(Path file) throws FedqException {
        byte[] raw;
        try {
            raw = Files.readAllBytes(file);
        } catch (IOException e) {
            throw new FedqException("cannot read the task spec " + file + ": " + Bin.reason(e));
        }
        Spec s = parse(new String(raw, java.nio.charset.StandardCharsets.UTF_8), file.toString());
        int end = raw.length > 0 && raw[raw.length - 1] == '\n' ? raw.length - 1 : raw.length;
        s.specHash = Bin.sha256(Arrays.copyOf(raw, end));
        return s;
    }

    public static Spec parse(String json, String where) throws FedqException {
        JsonNode root;
        try {
            root = new ObjectMapper().readTree(json);
        } catch (JsonProcessingException e) {
            throw new FedqException("task spec " + where + " is not JSON (this client reads the JSON spec that "
                    + "`fedq task init` writes): " + e.getOriginalMessage());
        }
        if (root == null || !root.isObject()) {
            throw new FedqException("task spec " + where + " is not a JSON object");
        }
        Spec s = new Spec();
        s.taskId = text(root, "task_id", where);
        JsonNode model = root.path("model");
        if (model.isObject()) {
            s.modelKind = model.path("kind").asText("logreg");
            JsonNode h = model.path("hidden");
            if (h.isArray()) {
                s.hidden = new int[h.size()];
                for (int i = 0; i < h.size(); i++) {
                    s.hidden[i] = h.get(i).asInt();
                }
            }
            s.activation = model.path("activation").asText("relu");
            s.dropout = model.path("dropout").asDouble(0.0);
        }
        if (!List.of("logreg", "mlp").contains(s.modelKind) || !List.of("relu", "tanh").contains(s.activation)) {
            throw new FedqException("task spec " + where + ": model kind " + s.modelKind + " / activation "
                    + s.activation + " is not one this client trains (logreg, mlp with relu or tanh)");
        }
        if (s.modelKind.equals("mlp") && s.hidden.length == 0) {
            throw new FedqException("task spec " + where + ": mlp needs at least one hidden layer");
        }
        JsonNode feats = root.path("features");
        if (!feats.isArray() || feats.size() == 0) {
            throw new FedqException("task spec " + where + " has no features");
        }
        for (JsonNode f : feats) {
            Feature x = new Feature();
            x.name = text(f, "name", where);
            String kind = text(f, "kind", where);
            if (kind.equals("numeric")) {
                x.numeric = true;
                x.mean = f.path("mean").asDouble();
                x.std = f.path("std").asDouble();
                if (!(x.std > 0)) {
                    throw new FedqException("task spec " + where + ": feature " + x.name + " needs std > 0");
                }
                JsonNode fill = f.path("fill");
                x.fill = fill.isNumber() ? fill.asDouble() : null;
            } else if (kind.equals("categorical")) {
                for (JsonNode v : f.path("vocabulary")) {
                    x.vocabulary.add(v.asText());
                }
            } else {
                throw new FedqException("task spec " + where + ": feature kind " + kind + " is unknown");
            }
            s.features.add(x);
        }
        JsonNode target = root.path("target");
        s.targetName = text(target, "name", where);
        JsonNode pos = target.path("positive");
        s.targetPositive = pos.isMissingNode() || pos.isNull() ? null : pos.asText();
        s.mode = root.path("mode").asText("async");
        JsonNode tr = root.path("training");
        s.epochs = tr.path("epochs").asInt(1);
        s.batchSize = tr.path("batch_size").asInt(32);
        s.lr = tr.path("lr").asDouble(0.05);
        s.proxMu = tr.path("prox_mu").asDouble(0.0);
        s.positiveWeight = tr.path("positive_weight").asDouble(1.0);
        for (JsonNode p : root.path("participants")) {
            s.participants.add(p.asText());
        }
        s.maxSamples = root.path("max_samples").asLong(1_000_000L);
        root.path("declared_samples").fields().forEachRemaining(e -> s.declaredSamples.put(e.getKey(), e.getValue().asLong()));
        JsonNode id = root.path("identity");
        s.requireSignatures = id.path("require_signatures").asBoolean(false);
        JsonNode ak = id.path("aggregator_key");
        s.aggregatorKey = ak.isTextual() ? ak.asText() : null;
        id.path("participant_keys").fields().forEachRemaining(e -> s.participantKeys.put(e.getKey(), e.getValue().asText()));
        JsonNode sa = root.path("secure_aggregation");
        s.secureAggregation = !(sa.isMissingNode() || sa.isNull());
        JsonNode pr = root.path("privacy");
        s.bankPrivacy = nonNull(pr.path("record")) || nonNull(pr.path("laplace"));
        JsonNode c = root.path("compression");
        if (nonNull(c)) {
            s.compression = text(c, "codec", where);
            JsonNode ll = c.path("lossless");
            s.compressionLossless = nonNull(ll) ? ll.asText() : null;
            s.stochasticRounding = c.path("stochastic_rounding").asBoolean(false);
            s.topkFraction = c.path("topk_fraction").asDouble(0.0);
            s.errorFeedback = c.path("error_feedback").asBoolean(true);
            if (!Codecs.LOSSY.contains(s.compression)) {
                throw new FedqException("task spec " + where + ": compression codec " + s.compression + " is unknown");
            }
        }
        return s;
    }

    private static boolean nonNull(JsonNode n) {
        return !(n.isMissingNode() || n.isNull());
    }

    private static String text(JsonNode n, String key, String where) throws FedqException {
        JsonNode v = n.path(key);
        if (!v.isTextual()) {
            throw new FedqException("task spec " + where + " lacks the text field " + key);
        }
        return v.asText();
    }

    /** The codec of this task's updates: the spec's lossy codec, else {@code fallback}. */
    public String updateCodec(String fallback) {
        if (compression == null) {
            return fallback;
        }
        return "zstd".equals(compressionLossless) ? compression + "+zstd" : compression;
    }
}
