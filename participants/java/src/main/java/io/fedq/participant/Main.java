package io.fedq.participant;

import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * {@code fedq-java run --spec FILE --participant NAME --data CSV --amqp-url URL [options]}:
 * one bank's worker. Errors are one line on stderr with a reason, and a non-zero exit.
 */
public final class Main {
    private Main() {}

    static final String USAGE = "usage: fedq-java run --spec SPEC.json --participant NAME --data ROWS.csv "
            + "--amqp-url amqps://NAME:PASSWORD@HOST:5671/fedq?cafile=CA [--key FILE] [--seed N] "
            + "[--val-fraction F] [--codec raw|zstd] [--wait-for-model S] [--max-updates N] [--max-seconds S] "
            + "[--delay S] [--receipt-wait S] [--stats FILE] [--quiet]\n"
            + "       fedq-java check --spec SPEC.json --participant NAME --data ROWS.csv [--key FILE]\n"
            + "       fedq-java bench --spec SPEC.json --participant NAME --data ROWS.csv --model MODEL.msgpack "
            + "[--updates N] [--key FILE]\n"
            + "The password may come from the environment instead: --amqp-url-env VAR.";

    /** The exit status, for a SIGTERM that arrives while the worker runs (the shutdown hook exits with it). */
    static final java.util.concurrent.atomic.AtomicInteger EXIT = new java.util.concurrent.atomic.AtomicInteger(0);
    static final CountDownLatch FINISHED = new CountDownLatch(1);

    public static void main(String[] argv) {
        int code;
        try {
            code = run(argv);
        } catch (FedqException e) {
            System.err.println("error: " + e.getMessage());
            code = e instanceof UsageException ? 2 : 1;
        } catch (RuntimeException | OutOfMemoryError e) {
            System.err.println("error: internal failure: " + e);
            code = 1;
        }
        EXIT.set(code);
        FINISHED.countDown();
        System.exit(code);
    }

    static final class UsageException extends FedqException {
        private static final long serialVersionUID = 1L;

        UsageException(String m) {
            super(m);
        }
    }

    static int run(String[] argv) throws FedqException {
        if (argv.length == 0 || argv[0].equals("--help") || argv[0].equals("-h")) {
            System.out.println(USAGE);
            return argv.length == 0 ? 2 : 0;
        }
        String command = argv[0];
        if (!command.equals("run") && !command.equals("check") && !command.equals("bench")) {
            throw new UsageException("unknown command " + command + " (run, check, bench); --help for the options");
        }
        Map<String, String> opts = new LinkedHashMap<>();
        List<String> flags = List.of("--quiet");
        List<String> known = List.of("--spec", "--participant", "--data", "--amqp-url", "--amqp-url-env", "--key",
                "--seed", "--val-fraction", "--codec", "--wait-for-model", "--max-updates", "--max-seconds", "--delay", "--receipt-wait",
                "--stats", "--quiet", "--model", "--updates");
        for (int i = 1; i < argv.length; i++) {
            String a = argv[i];
            if (!known.contains(a)) {
                throw new UsageException("unknown option " + a + "; --help for the options");
            }
            if (flags.contains(a)) {
                opts.put(a, "true");
                continue;
            }
            if (i + 1 >= argv.length) {
                throw new UsageException("option " + a + " needs a value");
            }
            opts.put(a, argv[++i]);
        }
        for (String need : List.of("--spec", "--participant", "--data")) {
            if (!opts.containsKey(need)) {
                throw new UsageException("missing " + need + "; --help for the options");
            }
        }
        Spec spec = Spec.load(Path.of(opts.get("--spec")));
        Participant.Config cfg = new Participant.Config();
        cfg.participant = opts.get("--participant");
        cfg.seed = (long) number(opts, "--seed", 0);
        cfg.valFraction = number(opts, "--val-fraction", 0.2);
        cfg.codec = opts.getOrDefault("--codec", "raw");
        cfg.waitForModelS = number(opts, "--wait-for-model", 5.0);
        cfg.maxUpdates = (long) number(opts, "--max-updates", -1);
        cfg.maxSeconds = number(opts, "--max-seconds", -1);
        cfg.delayS = number(opts, "--delay", 0.0);
        cfg.receiptWaitS = number(opts, "--receipt-wait", 10.0);
        cfg.quiet = opts.containsKey("--quiet");
        if (opts.containsKey("--stats")) {
            cfg.statsFile = Path.of(opts.get("--stats"));
        }
        if (opts.containsKey("--key")) {
            cfg.signingKey = Signing.readPrivateKey(Path.of(opts.get("--key")));
        }
        Participant.check(spec, cfg);
        Features data = Features.encode(Table.read(Path.of(opts.get("--data"))), spec);
        if (data.rows() == 0) {
            throw new FedqException("the table " + opts.get("--data") + " has no rows");
        }
        if (command.equals("check")) {
            int[][] split = Participant.split(data.rows(), cfg.valFraction, cfg.seed);
            System.out.println("ok: task " + spec.taskId + ", spec hash " + Bin.hex(spec.specHash) + ", " + data.rows()
                    + " rows (" + split[0].length + " for training), input_dim " + spec.inputDim() + ", model "
                    + spec.modelKind + ", " + new Net(spec).names.size() + " tensors");
            return 0;
        }
        if (command.equals("bench")) {
            return bench(spec, cfg, data, opts);
        }
        String url = opts.get("--amqp-url");
        if (url == null && opts.containsKey("--amqp-url-env")) {
            url = System.getenv(opts.get("--amqp-url-env"));
            if (url == null) {
                throw new UsageException("environment variable " + opts.get("--amqp-url-env") + " is not set");
            }
        }
        if (url == null) {
            throw new UsageException("missing --amqp-url (or --amqp-url-env VAR)");
        }
        Participant p = new Participant(spec, cfg, data, Broker.parse(url));
        Thread hook = new Thread(() -> {
            // SIGTERM or SIGINT: stop after the update in flight, close the connection, exit
            // with the worker's status (0 when it stopped cleanly).
            p.requestStop();
            try {
                if (FINISHED.await(20, TimeUnit.SECONDS)) {
                    Runtime.getRuntime().halt(EXIT.get());
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        });
        Runtime.getRuntime().addShutdownHook(hook);
        p.run();
        System.err.println("fedq-java " + cfg.participant + ": stopped (" + p.stats.stoppedBy + "): published "
                + p.stats.published + ", accepted " + p.stats.accepted + ", refused " + p.stats.refused);
        return 0;
    }

    /**
     * {@code bench --model FILE --updates N}: trains and encodes N updates from the model
     * envelope in FILE (as the Python worker would receive it), without a broker, and prints
     * one JSON line: per update the training and encoding milliseconds and the update bytes.
     */
    static int bench(Spec spec, Participant.Config cfg, Features data, Map<String, String> opts) throws FedqException {
        if (!opts.containsKey("--model")) {
            throw new UsageException("bench needs --model FILE (a model envelope)");
        }
        int updates = (int) number(opts, "--updates", 20);
        Participant p = new Participant(spec, cfg, data, null);
        byte[] body;
        try {
            body = java.nio.file.Files.readAllBytes(Path.of(opts.get("--model")));
        } catch (java.io.IOException e) {
            throw new FedqException("cannot read " + opts.get("--model") + ": " + Bin.reason(e));
        }
        Wire.Model model;
        try {
            model = Wire.decodeModel(body, p.net().names, p.net().shapes);
        } catch (WireException e) {
            throw new FedqException("the model in " + opts.get("--model") + " is refused " + e.getMessage());
        }
        StringBuilder train = new StringBuilder();
        StringBuilder encode = new StringBuilder();
        StringBuilder bytes = new StringBuilder();
        for (int k = 0; k < updates; k++) {
            Participant.Prepared u = p.prepare(model, k);
            if (u == null) {
                throw new FedqException("update " + k + ": the delta is not finite");
            }
            String sep = k == 0 ? "" : ",";
            train.append(sep).append(u.trainMs);
            encode.append(sep).append(u.encodeMs);
            bytes.append(sep).append(u.body.length);
        }
        System.out.println("{\"training_rows\":" + p.trainingRows() + ",\"train_ms\":[" + train + "],\"encode_ms\":["
                + encode + "],\"update_bytes\":[" + bytes + "]}");
        return 0;
    }

    private static double number(Map<String, String> opts, String key, double dflt) throws UsageException {
        String v = opts.get(key);
        if (v == null) {
            return dflt;
        }
        try {
            return Double.parseDouble(v);
        } catch (NumberFormatException e) {
            throw new UsageException("option " + key + " needs a number, not " + v);
        }
    }

}
