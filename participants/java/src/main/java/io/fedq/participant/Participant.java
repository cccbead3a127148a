package io.fedq.participant;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.Delivery;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.PrivateKey;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Date;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * A bank's worker (docs/protocol.md section 1): read the task's model stream, train on the
 * newest model, publish signed updates with confirms and retries, count the receipts.
 */
public final class Participant {
    /** Refusals that can never heal for this participant (wire-format section 11a). */
    public static final Set<String> PERMANENT = Set.of("too_large", "malformed", "unsupported_version", "wrong_kind",
            "unknown_field", "missing_field", "invalid_field", "unknown_codec", "too_many_tensors", "tensor_mismatch",
            "invalid_tensor", "bad_dtype", "bad_shape", "size_mismatch", "codec_error", "hash_mismatch",
            "unknown_task", "unknown_participant", "sender_mismatch", "unsigned", "bad_signature", "spec_mismatch",
            "too_many_samples", "not_masked");
    static final int SPEC_MISMATCHES_TO_STOP = 3;

    /** How this worker runs (the command's options). */
    public static final class Config {
        public String participant;
        public long seed = 0;
        public double valFraction = 0.2;
        public String codec = "raw";
        public double waitForModelS = 5.0;
        public long maxUpdates = -1;
        public double maxSeconds = -1;
        public double delayS = 0.0;
        /** On stop, how long to wait for the receipts of the updates published (seconds). */
        public double receiptWaitS = 10.0;
        public PrivateKey signingKey;
        public Path statsFile;
        public boolean quiet = false;
    }

    /** What the worker did: written to the stats file as JSON. */
    public static final class Stats {
        public long published;
        public long accepted;
        public final Map<String, Long> refused = new java.util.TreeMap<>();
        public final Map<String, Long> modelsRefused = new java.util.TreeMap<>();
        public long receiptsBadSignature;
        public long descentUnchecked;
        public long modelsSeen;
        public long firstVersion = -1;
        public long lastVersion = -1;
        public final List<String> publishedIds = new ArrayList<>();
        public final List<Double> trainMs = new ArrayList<>();
        public final List<Integer> updateBytes = new ArrayList<>();
        public final List<Double> encodeMs = new ArrayList<>();
        public String stoppedBy = "";
    }

    private final Spec spec;
    private final Config cfg;
    private final Net net;
    private final Features train;
    private final Features val;
    private final Broker.Target target;
    private final byte[] aggregatorKey;
    public final Stats stats = new Stats();
    private final Map<String, String> fates = new HashMap<>();
    private final LinkedBlockingQueue<Delivery> models = new LinkedBlockingQueue<>();
    private final AtomicBoolean stop = new AtomicBoolean(false);
    private volatile String permanentRefusal;
    private Connection conn;
    private Channel modelChannel;
    private Channel publishChannel;
    private Channel receiptChannel;
    private final Object statsLock = new Object();
    private List<Tensor> residual;
    private final long started = System.nanoTime();

    /** A worker; {@code target} null for one that only trains and encodes ({@code fedq-java bench}). */
    public Participant(Spec spec, Config cfg, Features all, Broker.Target target) throws FedqException {
        this.spec = spec;
        this.cfg = cfg;
        this.target = target;
        check(spec, cfg);
        if (target != null && !target.user.equals(cfg.participant)) {
            throw new FedqException("the broker user " + target.user + " is not the participant " + cfg.participant
                    + " (the login must be the participant id)");
        }
        this.net = new Net(spec);
        int[][] split = split(all.rows(), cfg.valFraction, cfg.seed);
        this.train = all.subset(split[0]);
        this.val = all.subset(split[1]);
        long declared = spec.declaredSamples.getOrDefault(cfg.participant, Long.MAX_VALUE);
        if (train.rows() > spec.maxSamples || train.rows() > declared) {
            throw new FedqException(cfg.participant + " has " + train.rows() + " training rows, more than the task allows ("
                    + "max_samples " + spec.maxSamples + (declared == Long.MAX_VALUE ? "" : ", declared_samples " + declared)
                    + "): every update would be refused too_many_samples");
        }
        try {
            this.aggregatorKey = spec.aggregatorKey == null ? null : Signing.rawPublic(spec.aggregatorKey);
        } catch (FedqException e) {
            throw new FedqException("task spec identity.aggregator_key: " + e.getMessage());
        }
    }

    /** Start-up refusals: what this client does not do, and keys that do not fit the spec. */
    public static void check(Spec spec, Config cfg) throws FedqException {
        if (spec.secureAggregation) {
            throw new FedqException("task " + spec.taskId + " uses secure aggregation, which this Java client does not "
                    + "support: run the Python participant (fedq participant run) for it");
        }
        if (spec.bankPrivacy) {
            throw new FedqException("task " + spec.taskId + " asks for differential privacy at the bank (privacy.record "
                    + "or privacy.laplace), which this Java client does not support: run the Python participant for it");
        }
        if (!spec.participants.isEmpty() && !spec.participants.contains(cfg.participant)) {
            throw new FedqException(cfg.participant + " is not a participant of task " + spec.taskId);
        }
        if (!Wire.NAME.matcher(cfg.participant).matches()) {
            throw new FedqException("participant id " + cfg.participant + " breaks the name rule [A-Za-z0-9][A-Za-z0-9_-]{0,63}");
        }
        String named = spec.participantKeys.get(cfg.participant);
        if (cfg.signingKey == null && (named != null || spec.requireSignatures)) {
            throw new FedqException("task " + spec.taskId + " requires a signing key for " + cfg.participant + ": pass --key FILE");
        }
        if (cfg.signingKey != null && named != null && !Signing.matches(cfg.signingKey, Signing.rawPublic(named))) {
            throw new FedqException("the key given is not the one the task spec names for " + cfg.participant
                    + " (fingerprint " + Signing.fingerprint(Signing.rawPublic(named)) + ")");
        }
        if (cfg.signingKey != null && named == null && spec.requireSignatures) {
            throw new FedqException("task " + spec.taskId + " requires signatures but names no key for " + cfg.participant);
        }
        if (!cfg.codec.equals("raw") && !cfg.codec.equals("zstd")) {
            throw new FedqException("--codec must be raw or zstd, not " + cfg.codec);
        }
        if (!(cfg.valFraction >= 0 && cfg.valFraction < 1)) {
            throw new FedqException("--val-fraction must be in [0, 1), not " + cfg.valFraction);
        }
    }

    /**
     * This client's own train/validation split (the Python one uses torch.randperm): round(n * f)
     * rows, at least 1 and leaving 1 when f > 0 and n >= 2, picked by a Fisher-Yates shuffle
     * with java.util.Random(seed); both index lists ascending.
     */
    public static int[][] split(int n, double f, long seed) {
        int nVal = (int) Math.rint(n * f);
        if (f > 0 && n >= 2) {
            nVal = Math.max(1, Math.min(n - 1, nVal));
        } else if (n < 2) {
            nVal = 0;
        }
        int[] perm = new int[n];
        for (int i = 0; i < n; i++) {
            perm[i] = i;
        }
        Random rng = new Random(seed);
        for (int i = n - 1; i > 0; i--) {
            int j = rng.nextInt(i + 1);
            int t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        int[] v = Arrays.copyOfRange(perm, 0, nVal);
        int[] t = Arrays.copyOfRange(perm, nVal, n);
        Arrays.sort(v);
        Arrays.sort(t);
        return new int[][] {t, v};
    }

    /** The seed of update number k: the first 4 bytes, little-endian, of SHA-256("seed:participant:k"). */
    public static long updateSeed(long seed, String participant, long k) {
        byte[] h = Bin.sha256(Bin.utf8(seed + ":" + participant + ":" + k));
        return Bin.u32le(h, 0);
    }

    public int trainingRows() {
        return train.rows();
    }

    /** The task model's tensor names and shapes. */
    public Net net() {
        return net;
    }

    public void requestStop() {
        stop.set(true);
    }

    void log(String msg) {
        if (!cfg.quiet) {
            System.err.println("fedq-java " + cfg.participant + ": " + msg);
        }
    }

    // ------------------------------------------------------------------- the loop

    /** Runs until stopped, the update cap, the time budget, or a permanent refusal. */
    public void run() throws FedqException {
        conn = Broker.connect(target, "fedq-java-" + cfg.participant);
        try {
            String stream = "fedq.model." + spec.taskId;
            String receipts = "fedq.receipt." + spec.taskId + "." + cfg.participant;
            modelChannel = conn.createChannel();
            waitForStream(stream);
            modelChannel.basicQos(4);
            Map<String, Object> args = new HashMap<>();
            args.put("x-stream-offset", "last");
            modelChannel.basicConsume(stream, false, args, (tag, d) -> models.add(d), tag -> { });
            Channel rc = conn.createChannel();
            receiptChannel = rc;
            rc.basicQos(64);
            rc.basicConsume(receipts, false, (tag, d) -> onReceipt(rc, d), tag -> { });
            publishChannel = openPublishChannel();
            loop();
            awaitReceipts();
        } catch (IOException | ShutdownSignalException e) {
            throw new FedqException("broker error: " + brokerReason(e));
        } finally {
            writeStats();
            try {
                conn.close(5000);
            } catch (IOException | ShutdownSignalException e) {
                // closing anyway
            }
        }
        if (permanentRefusal != null) {
            throw new FedqException("stopped: an update was refused " + permanentRefusal
                    + ", which never heals for this participant");
        }
    }

    /** Waits up to receiptWaitS until every published update has its receipt. */
    private void awaitReceipts() throws FedqException {
        long until = System.nanoTime() + (long) (cfg.receiptWaitS * 1e9);
        while (permanentRefusal == null && System.nanoTime() < until) {
            checkOpen();
            synchronized (statsLock) {
                if (fates.keySet().containsAll(stats.publishedIds)) {
                    return;
                }
            }
            sleep(0.05);
        }
    }

    private void waitForStream(String stream) throws IOException, FedqException {
        double delay = 0.1;
        while (!stop.get()) {
            try {
                modelChannel.queueDeclarePassive(stream);
                return;
            } catch (IOException e) {
                String why = brokerReason(e);
                if (!why.contains("404")) {
                    throw new FedqException("cannot read the model stream " + stream + ": " + why);
                }
                modelChannel = conn.createChannel();
                sleep(delay);
                delay = Math.min(10.0, delay * 2);
            }
        }
    }

    static String brokerReason(Throwable e) {
        for (Throwable c = e; c != null; c = c.getCause()) {
            if (c instanceof ShutdownSignalException) {
                Object r = ((ShutdownSignalException) c).getReason();
                if (r instanceof AMQP.Channel.Close) {
                    AMQP.Channel.Close cl = (AMQP.Channel.Close) r;
                    return cl.getReplyCode() + " " + cl.getReplyText();
                }
                if (r instanceof AMQP.Connection.Close) {
                    AMQP.Connection.Close cl = (AMQP.Connection.Close) r;
                    return cl.getReplyCode() + " " + cl.getReplyText();
                }
            }
        }
        return e.getMessage() == null ? e.getClass().getSimpleName() : e.getMessage();
    }

    private static void sleep(double s) {
        try {
            Thread.sleep((long) (s * 1000));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    private boolean done() {
        if (stop.get()) {
            stats.stoppedBy = "stopped";
            return true;
        }
        if (permanentRefusal != null) {
            stats.stoppedBy = "refused " + permanentRefusal;
            return true;
        }
        if (cfg.maxUpdates >= 0 && stats.published >= cfg.maxUpdates) {
            stats.stoppedBy = "max_updates";
            return true;
        }
        if (cfg.maxSeconds >= 0 && (System.nanoTime() - started) / 1e9 >= cfg.maxSeconds) {
            stats.stoppedBy = "max_seconds";
            return true;
        }
        return false;
    }

    /** The model in hand and its delivery (held unacked while training on it). */
    private Wire.Model current;
    private Delivery held;
    private byte[] lastAcceptedHash;
    private long lastAcceptedVersion = -1;
    private int specMismatches;

    private void loop() throws IOException, FedqException {
        long k = 0;
        while (!done()) {
            settle(current == null ? 0.5 : 0.0);
            if (current == null) {
                continue;
            }
            Wire.Model base = current;
            publishOnce(base, k++);
            if (done()) {
                break;
            }
            if (cfg.delayS > 0) {
                sleep(cfg.delayS);
            }
            if (spec.mode.equals("async")) {
                // after publishing, wait up to wait_for_model_s for a newer model, else train again
                long until = System.nanoTime() + (long) (cfg.waitForModelS * 1e9);
                while (!done() && System.nanoTime() < until && current == base) {
                    settle(Math.min(0.2, Math.max(0, (until - System.nanoTime()) / 1e9)));
                }
            } else {
                while (!done() && current == base) {
                    settle(0.5);
                }
            }
        }
    }

    /** Refuses to go on when the connection, the model channel or the receipt channel has closed. */
    private void checkOpen() throws FedqException {
        if (!conn.isOpen() || !modelChannel.isOpen() || !receiptChannel.isOpen()) {
            ShutdownSignalException why = !conn.isOpen() ? conn.getCloseReason()
                    : !modelChannel.isOpen() ? modelChannel.getCloseReason() : receiptChannel.getCloseReason();
            throw new FedqException("lost the broker connection (" + (why == null ? "closed" : brokerReason(why))
                    + "); a restart reads the model stream from its last announcement again");
        }
    }

    /**
     * Takes every waiting delivery (waiting up to {@code waitS} for the first), keeps the one
     * with the highest x-fedq-version (of equals the later), acks the others, and makes it the
     * model in hand when it decodes, checks and is newer. Returns whether the model changed.
     */
    private boolean settle(double waitS) throws IOException, FedqException {
        checkOpen();
        List<Delivery> batch = new ArrayList<>();
        try {
            Delivery first = waitS > 0 ? models.poll((long) (waitS * 1000), TimeUnit.MILLISECONDS) : models.poll();
            if (first == null) {
                return false;
            }
            batch.add(first);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return false;
        }
        models.drainTo(batch);
        Delivery keep = null;
        long best = Long.MIN_VALUE;
        for (Delivery d : batch) {
            long v = headerVersion(d);
            if (keep == null || v >= best) {
                if (keep != null) {
                    ack(keep);
                }
                keep = d;
                best = v;
            } else {
                ack(d);
            }
        }
        byte[] body = keep.getBody();
        if (Wire.isChunk(body)) {
            ack(keep);
            throw new FedqException("model announcement of task " + spec.taskId + " arrives as a chunk set "
                    + "(docs/chunking.md); this Java client does not reassemble chunks: its models must fit one message");
        }
        Wire.Model m;
        try {
            m = Wire.decodeModel(body, net.names, net.shapes);
        } catch (WireException e) {
            refuseModel(keep, e.reason, e.getMessage());
            return false;
        }
        if (!m.task.equals(spec.taskId)) {
            refuseModel(keep, "unknown_task", "announcement of task " + m.task);
            return false;
        }
        String why = checkModel(m);
        if (why != null) {
            refuseModel(keep, why, "version " + m.version);
            return false;
        }
        if (current != null && m.version <= current.version) {
            if (m.version == current.version && Arrays.equals(m.versionHash, current.versionHash)) {
                // the same model again (a re-announcement, a reconnect): hold the new copy
                if (held != null) {
                    ack(held);
                }
                held = keep;
            } else {
                ack(keep);
            }
            return false;
        }
        if (held != null) {
            ack(held);
        }
        held = keep;
        current = m;
        synchronized (statsLock) {
            stats.modelsSeen++;
            if (stats.firstVersion < 0) {
                stats.firstVersion = m.version;
            }
            stats.lastVersion = m.version;
        }
        return true;
    }

    /** The checks of docs/protocol.md section 11 for an announcement; null when it passes. */
    private String checkModel(Wire.Model m) throws FedqException {
        if (aggregatorKey != null) {
            if (m.signature == null) {
                return "unsigned";
            }
            byte[] sh = m.specHash == null ? new byte[32] : m.specHash;
            byte[] msg = Wire.modelSigningMessage(m.task, m.version, m.versionHash, m.hash, sh, m.ancestors);
            if (m.specHash == null || !Signing.verify(aggregatorKey, msg, m.signature)) {
                return "bad_signature";
            }
        }
        if (m.specHash != null && !Arrays.equals(m.specHash, spec.specHash)) {
            specMismatches++;
            if (specMismatches >= SPEC_MISMATCHES_TO_STOP) {
                throw new FedqException(SPEC_MISMATCHES_TO_STOP + " model announcements in a row were made under another "
                        + "task spec (spec hash " + Bin.hex(m.specHash) + ", ours " + Bin.hex(spec.specHash)
                        + "): the spec file is out of date");
            }
            return "spec_mismatch";
        }
        if (lastAcceptedVersion >= 0 && lastAcceptedHash != null && m.versionHash.length == 32) {
            if (m.version == lastAcceptedVersion && !Arrays.equals(m.versionHash, lastAcceptedHash)) {
                return "not_descendant";
            }
            if (m.version > lastAcceptedVersion) {
                long pos = m.version - lastAcceptedVersion - 1;
                if (pos < m.ancestors.size()) {
                    if (!Arrays.equals(m.ancestors.get((int) pos), lastAcceptedHash)) {
                        return "not_descendant";
                    }
                } else {
                    stats.descentUnchecked++;
                }
            }
        }
        specMismatches = 0;
        if (m.version >= lastAcceptedVersion) {
            lastAcceptedVersion = m.version;
            lastAcceptedHash = m.versionHash;
        }
        return null;
    }

    private void refuseModel(Delivery d, String reason, String detail) throws IOException {
        ack(d);
        synchronized (statsLock) {
            stats.modelsRefused.merge(reason, 1L, Long::sum);
        }
        log("model refused " + reason + ": " + detail);
    }

    static long headerVersion(Delivery d) {
        Map<String, Object> h = d.getProperties().getHeaders();
        Object v = h == null ? null : h.get("x-fedq-version");
        return v instanceof Number ? ((Number) v).longValue() : -1;
    }

    private void ack(Delivery d) throws IOException {
        try {
            modelChannel.basicAck(d.getEnvelope().getDeliveryTag(), false);
        } catch (ShutdownSignalException e) {
            // its channel is gone: nothing to ack
        }
    }

    // ------------------------------------------------------------------ an update

    /** One local update, trained and encoded (not yet published), with its timings. */
    public static final class Prepared {
        public final String id;
        public final byte[] body;
        public final double trainMs;
        public final double encodeMs;

        Prepared(String id, byte[] body, double trainMs, double encodeMs) {
            this.id = id;
            this.body = body;
            this.trainMs = trainMs;
            this.encodeMs = encodeMs;
        }
    }

    private Wire.Model evaluated;
    private Map<String, Double> valMetrics = Map.of();

    /**
     * Trains update number {@code k} from {@code base} and encodes it (metrics, compression,
     * content hash, signature); null when the delta is not finite. The validation metrics are
     * computed once per model, with the received parameters (not counted in trainMs).
     */
    public Prepared prepare(Wire.Model base, long k) throws FedqException {
        if (evaluated != base) {
            valMetrics = net.evaluate(base.tensors, val);
            evaluated = base;
        }
        long t0 = System.nanoTime();
        Net.Result r = net.train(base.tensors, train, Net.Settings.of(spec), new Random(updateSeed(cfg.seed, cfg.participant, k)));
        double trainMs = (System.nanoTime() - t0) / 1e6;
        for (Tensor t : r.delta) {
            for (float f : t.data) {
                if (!Float.isFinite(f)) {
                    return null;
                }
            }
        }
        Map<String, Double> metrics = new LinkedHashMap<>();
        if (Double.isFinite(r.trainLoss)) {
            metrics.put("train_loss", r.trainLoss);
        }
        for (Map.Entry<String, Double> e : valMetrics.entrySet()) {
            if (Double.isFinite(e.getValue())) {
                metrics.put("val_" + e.getKey(), e.getValue());
            }
        }
        long t1 = System.nanoTime();
        Wire.Update u = buildUpdate(base, r.delta, metrics, k);
        byte[] body = Wire.encodeUpdate(u);
        return new Prepared(u.id, body, trainMs, (System.nanoTime() - t1) / 1e6);
    }

    private void publishOnce(Wire.Model base, long k) throws FedqException {
        Prepared p = prepare(base, k);
        if (p == null) {
            log("update " + k + ": the delta is not finite; nothing published");
            return;
        }
        if (p.body.length > 8 * 1024 * 1024) {
            throw new FedqException("an update of " + p.body.length + " bytes needs a chunk set (docs/chunking.md), "
                    + "which this Java client does not send");
        }
        publish(p.id, p.body);
        synchronized (statsLock) {
            stats.published++;
            stats.publishedIds.add(p.id);
            stats.trainMs.add(p.trainMs);
            stats.encodeMs.add(p.encodeMs);
            stats.updateBytes.add(p.body.length);
        }
        writeStats();
        log(String.format(Locale.ROOT, "published %s on version %d (codec %s, %d bytes, trained in %.1f ms)", p.id,
                base.version, spec.updateCodec(cfg.codec), p.body.length, p.trainMs));
    }

    Wire.Update buildUpdate(Wire.Model base, List<Tensor> delta, Map<String, Double> metrics, long k) throws FedqException {
        Wire.Update u = new Wire.Update();
        u.task = spec.taskId;
        u.participant = cfg.participant;
        u.id = UUID.randomUUID().toString().replace("-", "");
        u.baseVersion = base.version;
        u.samples = train.rows();
        u.metrics = metrics;
        u.codec = spec.updateCodec(cfg.codec);
        Random rounding = spec.stochasticRounding ? new Random(updateSeed(cfg.seed + 1, cfg.participant, k)) : null;
        List<Tensor> decoded = new ArrayList<>();
        List<Tensor> nextResidual = new ArrayList<>();
        for (int i = 0; i < delta.size(); i++) {
            Tensor t = delta.get(i);
            float[] x = t.data.clone();
            boolean lossy = spec.compression != null;
            if (lossy && spec.errorFeedback && residual != null) {
                for (int j = 0; j < x.length; j++) {
                    x[j] = x[j] + residual.get(i).data[j];
                }
            }
            Codecs.Encoded e = Codecs.encode(u.codec, x, t.shape, spec.topkFraction, rounding);
            u.tensors.add(t.withData(e.decoded));
            u.payloads.add(e.payload);
            decoded.add(t.withData(e.decoded));
            float[] res = new float[x.length];
            for (int j = 0; j < x.length; j++) {
                res[j] = x[j] - e.decoded[j];
            }
            nextResidual.add(t.withData(res));
        }
        if (spec.compression != null && spec.errorFeedback) {
            residual = nextResidual;
        }
        u.hash = Wire.contentHash(decoded);
        u.createdAt = System.currentTimeMillis() / 1000.0;
        u.specHash = spec.specHash;
        if (cfg.signingKey != null) {
            try {
                u.signature = Signing.sign(cfg.signingKey, Wire.updateSigningMessage(u.task, u.participant, u.id,
                        u.baseVersion, u.samples, u.hash, u.specHash, u.metrics));
            } catch (GeneralSecurityException e) {
                throw new FedqException("cannot sign the update: " + e.getMessage());
            }
        }
        return u;
    }

    private volatile boolean returned;

    private Channel openPublishChannel() throws IOException {
        Channel ch = conn.createChannel();
        ch.confirmSelect();
        ch.addReturnListener(ret -> returned = true);
        return ch;
    }

    /**
     * Publishes one body (docs/protocol.md sections 8.2, 8.3, 10): confirmed, mandatory; a
     * channel closed 403, 404 or 406 is final; anything else is retried with the same body on
     * a new channel, 0.05 s doubling to 5 s between tries, for at most 300 s.
     */
    void publish(String id, byte[] body) throws FedqException {
        AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                .contentType("application/x-fedq+msgpack").deliveryMode(2).messageId(id).userId(cfg.participant)
                .timestamp(new Date()).build();
        String key = "update." + spec.taskId + "." + cfg.participant;
        long deadline = System.nanoTime() + 300_000_000_000L;
        double delay = 0.05;
        String last = "";
        while (true) {
            try {
                if (publishChannel == null || !publishChannel.isOpen()) {
                    publishChannel = openPublishChannel();
                }
                returned = false;
                publishChannel.basicPublish("fedq.updates", key, true, props, body);
                publishChannel.waitForConfirmsOrDie(30_000);
                if (!returned) {
                    return;
                }
                last = "returned unroutable (312 NO_ROUTE): the aggregator has not declared task " + spec.taskId;
            } catch (IOException | ShutdownSignalException e) {
                last = brokerReason(e);
                if (last.startsWith("403") || last.startsWith("404") || last.startsWith("406")) {
                    throw new FedqException("the broker refused update " + id + ": " + last);
                }
                if (!conn.isOpen()) {
                    throw new FedqException("lost the broker connection while publishing update " + id + ": " + last);
                }
            } catch (TimeoutException e) {
                last = "no confirm within 30 s";
                try {
                    publishChannel.abort(); // retried on a new channel
                } catch (IOException | ShutdownSignalException ignored) {
                    // closing anyway
                }
                publishChannel = null;
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new FedqException("interrupted while publishing update " + id);
            }
            if (System.nanoTime() > deadline) {
                throw new FedqException("could not publish update " + id + " within 300 s: " + last);
            }
            log("publish of " + id + " failed (" + last + "); retrying in " + delay + " s");
            sleep(delay);
            delay = Math.min(5.0, delay * 2);
        }
    }

    // ------------------------------------------------------------------ receipts

    private void onReceipt(Channel ch, Delivery d) throws IOException {
        try {
            String kind = Wire.peekKind(d.getBody());
            if ("ur".equals(kind)) {
                log("ignored an unmask request: this client does not take part in secure aggregation");
                return;
            }
            Wire.Receipt r;
            try {
                r = Wire.decodeReceipt(d.getBody());
            } catch (WireException e) {
                log("receipt unreadable; ignored: " + e.getMessage());
                return;
            }
            if (aggregatorKey != null) {
                byte[] msg = Wire.receiptSigningMessage(r.task, r.participant, r.id, r.outcome,
                        r.outcome.equals("accepted") ? r.version : 0, r.outcome.equals("accepted") ? r.weight : 0.0,
                        r.outcome.equals("accepted") ? "" : r.reason);
                if (!Signing.verify(aggregatorKey, msg, r.signature)) {
                    synchronized (statsLock) {
                        stats.receiptsBadSignature++;
                    }
                    return;
                }
            }
            if (!r.task.equals(spec.taskId) || !r.participant.equals(cfg.participant)) {
                return;
            }
            synchronized (statsLock) {
                String before = fates.get(r.id);
                if (before == null) {
                    fates.put(r.id, r.outcome.equals("accepted") ? "accepted" : r.reason);
                    if (r.outcome.equals("accepted")) {
                        stats.accepted++;
                    } else {
                        stats.refused.merge(r.reason, 1L, Long::sum);
                    }
                } else if (!before.equals("accepted") && r.outcome.equals("accepted")) {
                    fates.put(r.id, "accepted");
                    stats.refused.merge(before, -1L, Long::sum);
                    stats.refused.remove(before, 0L);
                    stats.accepted++;
                }
            }
            if (r.outcome.equals("refused") && PERMANENT.contains(r.reason)) {
                log("update " + r.id + " refused " + r.reason + ": " + r.detail);
                permanentRefusal = r.reason + " (" + r.detail + ")";
            }
        } catch (RuntimeException e) {
            // a receipt this client cannot read must not stop the consumer (the channel would close)
            log("receipt unreadable; ignored (" + e.getClass().getSimpleName() + ")");
        } finally {
            try {
                ch.basicAck(d.getEnvelope().getDeliveryTag(), false);
            } catch (ShutdownSignalException e) {
                // the channel is gone; the receipt comes again
            }
            writeStats();
        }
    }

    // -------------------------------------------------------------------- stats

    void writeStats() {
        if (cfg.statsFile == null) {
            return;
        }
        String json;
        synchronized (statsLock) {
            StringBuilder sb = new StringBuilder("{");
            sb.append("\"participant\":").append(q(cfg.participant));
            sb.append(",\"training_rows\":").append(train.rows());
            sb.append(",\"validation_rows\":").append(val.rows());
            sb.append(",\"published\":").append(stats.published);
            sb.append(",\"accepted\":").append(stats.accepted);
            sb.append(",\"refused\":").append(map(stats.refused));
            sb.append(",\"models_refused\":").append(map(stats.modelsRefused));
            sb.append(",\"receipts_bad_signature\":").append(stats.receiptsBadSignature);
            sb.append(",\"descent_unchecked\":").append(stats.descentUnchecked);
            sb.append(",\"models_seen\":").append(stats.modelsSeen);
            sb.append(",\"first_version\":").append(stats.firstVersion);
            sb.append(",\"last_version\":").append(stats.lastVersion);
            sb.append(",\"stopped_by\":").append(q(stats.stoppedBy));
            sb.append(",\"published_ids\":[");
            for (int i = 0; i < stats.publishedIds.size(); i++) {
                sb.append(i > 0 ? "," : "").append(q(stats.publishedIds.get(i)));
            }
            sb.append("],\"train_ms\":").append(stats.trainMs);
            sb.append(",\"encode_ms\":").append(stats.encodeMs);
            sb.append(",\"update_bytes\":").append(stats.updateBytes);
            sb.append("}\n");
            json = sb.toString();
        }
        try {
            Path tmp = cfg.statsFile.resolveSibling(cfg.statsFile.getFileName() + ".tmp");
            Files.writeString(tmp, json);
            Files.move(tmp, cfg.statsFile, java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                    java.nio.file.StandardCopyOption.ATOMIC_MOVE);
        } catch (IOException e) {
            log("cannot write the stats file: " + e.getMessage());
        }
    }

    private static String q(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
    }

    private static String map(Map<String, Long> m) {
        StringBuilder sb = new StringBuilder("{");
        for (Map.Entry<String, Long> e : m.entrySet()) {
            sb.append(sb.length() > 1 ? "," : "").append(q(e.getKey())).append(":").append(e.getValue());
        }
        return sb.append("}").toString();
    }
}
