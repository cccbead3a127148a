package io.fedq.participant;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

/**
 * The task's model (docs/protocol.md section 6: a logistic regression or an MLP, float32
 * parameters) and its local training (section 7): plain SGD on the weighted binary cross
 * entropy, optionally with the FedProx term. Forward and backward passes are computed in
 * float64; parameters are float32 and rounded once per step.
 */
public final class Net {
    public final List<String> names = new ArrayList<>();
    public final List<long[]> shapes = new ArrayList<>();
    /** Linear layers: their input and output widths. */
    final int[] ins;
    final int[] outs;
    final boolean tanh;
    final double dropout;

    public Net(Spec spec) {
        this(spec.inputDim(), spec.modelKind.equals("mlp") ? spec.hidden : new int[0], spec.activation.equals("tanh"),
                spec.dropout);
    }

    public Net(int inputDim, int[] hidden, boolean tanh, double dropout) {
        this.tanh = tanh;
        this.dropout = dropout;
        int layers = hidden.length + 1;
        ins = new int[layers];
        outs = new int[layers];
        int index = 0;
        int in = inputDim;
        for (int l = 0; l < layers; l++) {
            int out = l < hidden.length ? hidden[l] : 1;
            ins[l] = in;
            outs[l] = out;
            names.add(index + ".weight");
            shapes.add(new long[] {out, in});
            names.add(index + ".bias");
            shapes.add(new long[] {out});
            // Linear, then (hidden layers) the activation and, with dropout, a Dropout: each an index.
            index += l < hidden.length ? (dropout > 0 ? 3 : 2) : 1;
            in = out;
        }
    }

    /** The training settings of the spec's {@code training} section. */
    public static final class Settings {
        public int epochs = 1;
        public int batchSize = 32;
        public double lr = 0.05;
        public double positiveWeight = 1.0;
        public double proxMu = 0.0;

        public static Settings of(Spec s) {
            Settings t = new Settings();
            t.epochs = s.epochs;
            t.batchSize = s.batchSize;
            t.lr = s.lr;
            t.positiveWeight = s.positiveWeight;
            t.proxMu = s.proxMu;
            return t;
        }
    }

    /** What local training gives: the delta (trained minus received, float32) and the mean step loss. */
    public static final class Result {
        public final List<Tensor> delta;
        public final double trainLoss;
        public final int steps;

        Result(List<Tensor> delta, double trainLoss, int steps) {
            this.delta = delta;
            this.trainLoss = trainLoss;
            this.steps = steps;
        }
    }

    /** Copies of the parameters, in the model's order (a weight [out][in] row-major, then its bias). */
    float[][] copy(List<Tensor> params) {
        float[][] p = new float[params.size()][];
        for (int i = 0; i < p.length; i++) {
            p[i] = params.get(i).data.clone();
        }
        return p;
    }

    private double act(double z) {
        return tanh ? Math.tanh(z) : Math.max(0.0, z);
    }

    private double actGrad(double z, double a) {
        return tanh ? 1.0 - a * a : (z > 0 ? 1.0 : 0.0);
    }

    /** The logit of each row of {@code x} (evaluation mode: no dropout). */
    public double[] logits(List<Tensor> params, float[][] x) {
        float[][] p = copy(params);
        double[] out = new double[x.length];
        for (int r = 0; r < x.length; r++) {
            double[] a = new double[x[r].length];
            for (int j = 0; j < a.length; j++) {
                a[j] = x[r][j];
            }
            for (int l = 0; l < ins.length; l++) {
                double[] z = linear(p[2 * l], p[2 * l + 1], a, ins[l], outs[l]);
                if (l < ins.length - 1) {
                    for (int j = 0; j < z.length; j++) {
                        z[j] = act(z[j]);
                    }
                }
                a = z;
            }
            out[r] = a[0];
        }
        return out;
    }

    private static double[] linear(float[] w, float[] b, double[] a, int in, int out) {
        double[] z = new double[out];
        for (int o = 0; o < out; o++) {
            double s = b[o];
            int base = o * in;
            for (int i = 0; i < in; i++) {
                s += w[base + i] * a[i];
            }
            z[o] = s;
        }
        return z;
    }

    /**
     * Trains from {@code received} on every row of {@code data} ({@code rng} orders the rows of
     * each epoch and draws dropout; full-batch training does not depend on it).
     */
    public Result train(List<Tensor> received, Features data, Settings s, Random rng) {
        float[][] p = copy(received);
        float[][] p0 = copy(received);
        int n = data.rows();
        double lossSum = 0;
        int steps = 0;
        int[] order = new int[n];
        for (int i = 0; i < n; i++) {
            order[i] = i;
        }
        Buffers buf = new Buffers();
        for (int epoch = 0; epoch < s.epochs; epoch++) {
            for (int i = n - 1; i > 0; i--) { // Fisher-Yates with the client's own generator
                int j = rng.nextInt(i + 1);
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
            for (int start = 0; start < n; start += s.batchSize) {
                int end = Math.min(n, start + s.batchSize);
                int bsz = end - start;
                double[][] grads = new double[p.length][];
                for (int i = 0; i < p.length; i++) {
                    grads[i] = new double[p[i].length];
                }
                double loss = 0;
                for (int bi = start; bi < end; bi++) {
                    loss += backward(p, data.x[order[bi]], data.y[order[bi]], s.positiveWeight, bsz, grads, buf, rng);
                }
                loss /= bsz;
                if (s.proxMu > 0) {
                    double sq = 0;
                    for (int i = 0; i < p.length; i++) {
                        for (int j = 0; j < p[i].length; j++) {
                            double d = (double) p[i][j] - p0[i][j];
                            sq += d * d;
                            grads[i][j] += s.proxMu * d;
                        }
                    }
                    loss += s.proxMu / 2.0 * sq;
                }
                for (int i = 0; i < p.length; i++) {
                    for (int j = 0; j < p[i].length; j++) {
                        p[i][j] = (float) (p[i][j] - s.lr * (float) grads[i][j]);
                    }
                }
                lossSum += loss;
                steps++;
            }
        }
        List<Tensor> delta = new ArrayList<>();
        for (int i = 0; i < p.length; i++) {
            float[] d = new float[p[i].length];
            for (int j = 0; j < d.length; j++) {
                d[j] = p[i][j] - p0[i][j]; // float32 subtraction
            }
            delta.add(new Tensor(names.get(i), shapes.get(i), d));
        }
        return new Result(delta, steps == 0 ? 0.0 : lossSum / steps, steps);
    }

    /** Per-row work arrays, allocated once per training. */
    private final class Buffers {
        final double[][] a = new double[ins.length + 1][];
        final double[][] z = new double[ins.length][];
        final double[][] mask = new double[ins.length][];
        final double[][] dz = new double[ins.length][];

        Buffers() {
            for (int l = 0; l < ins.length; l++) {
                a[l] = new double[ins[l]];
                z[l] = new double[outs[l]];
                mask[l] = new double[outs[l]];
                dz[l] = new double[outs[l]];
            }
            a[ins.length] = z[ins.length - 1];
        }
    }

    private static void linearInto(float[] w, float[] b, double[] a, int in, int out, double[] z) {
        for (int o = 0; o < out; o++) {
            double sum = b[o];
            int base = o * in;
            for (int i = 0; i < in; i++) {
                sum += w[base + i] * a[i];
            }
            z[o] = sum;
        }
    }

    /** One row's forward and backward pass: adds its gradient / bsz into grads, returns its loss. */
    private double backward(float[][] p, float[] x, float y, double pw, int bsz, double[][] grads, Buffers b,
                            Random rng) {
        int layers = ins.length;
        for (int j = 0; j < ins[0]; j++) {
            b.a[0][j] = x[j];
        }
        for (int l = 0; l < layers; l++) {
            linearInto(p[2 * l], p[2 * l + 1], b.a[l], ins[l], outs[l], b.z[l]);
            if (l < layers - 1) {
                double[] h = b.a[l + 1];
                for (int j = 0; j < h.length; j++) {
                    double m = 1.0;
                    if (dropout > 0) {
                        m = rng.nextDouble() < dropout ? 0.0 : 1.0 / (1.0 - dropout);
                    }
                    b.mask[l][j] = m;
                    h[j] = act(b.z[l][j]) * m;
                }
            }
        }
        double logit = b.z[layers - 1][0];
        double logWeight = (pw - 1.0) * y + 1.0;
        double loss = (1.0 - y) * logit + logWeight * (Math.log1p(Math.exp(-Math.abs(logit))) + Math.max(-logit, 0.0));
        double sig = 1.0 / (1.0 + Math.exp(-logit));
        b.dz[layers - 1][0] = ((pw * y + 1.0 - y) * sig - pw * y) / bsz;
        for (int l = layers - 1; l >= 0; l--) {
            int in = ins[l];
            double[] dz = b.dz[l];
            double[] gw = grads[2 * l];
            double[] gb = grads[2 * l + 1];
            double[] a = b.a[l];
            float[] w = p[2 * l];
            double[] da = l > 0 ? b.dz[l - 1] : null;
            if (da != null) {
                java.util.Arrays.fill(da, 0.0);
            }
            for (int o = 0; o < outs[l]; o++) {
                double d = dz[o];
                if (d == 0.0) {
                    continue;
                }
                gb[o] += d;
                int base = o * in;
                for (int i = 0; i < in; i++) {
                    gw[base + i] += d * a[i];
                }
                if (da != null) {
                    for (int i = 0; i < in; i++) {
                        da[i] += d * w[base + i];
                    }
                }
            }
            if (da != null) {
                double[] m = b.mask[l - 1];
                double[] zp = b.z[l - 1];
                for (int i = 0; i < in; i++) {
                    double act = m[i] == 0.0 ? 0.0 : a[i] / m[i];
                    da[i] = da[i] * m[i] * actGrad(zp[i], act);
                }
            }
        }
        return loss;
    }

    // -------------------------------------------------------------------- metrics

    /** Metrics of {@code params} on {@code data} (docs/protocol.md section 7.3), keys without the {@code val_} prefix. */
    public Map<String, Double> evaluate(List<Tensor> params, Features data) {
        Map<String, Double> out = new LinkedHashMap<>();
        int n = data.rows();
        if (n == 0) {
            out.put("n", 0.0);
            return out;
        }
        double[] z = logits(params, data.x);
        double[] prob = new double[n];
        double loss = 0;
        double brier = 0;
        double pos = 0;
        for (int i = 0; i < n; i++) {
            // probabilities in float32, as the reference computes them
            double pr = (float) (1.0 / (1.0 + Math.exp(-z[i])));
            if (Double.isNaN(pr)) {
                pr = 0.5;
            }
            prob[i] = pr;
            double c = Math.min(Math.max(pr, 1e-7), 1 - 1e-7);
            double y = data.y[i];
            loss += -(y * Math.log(c) + (1 - y) * Math.log(1 - c));
            brier += (pr - y) * (pr - y);
            pos += y;
        }
        out.put("loss", Double.isFinite(loss / n) ? loss / n : 1e9);
        out.put("brier", brier / n);
        out.put("positive_rate", pos / n);
        out.put("n", (double) n);
        if (pos > 0 && pos < n) {
            out.put("auc", rocAuc(data.y, prob));
            out.put("pr_auc", averagePrecision(data.y, prob));
        }
        return out;
    }

    /** ROC AUC: the Mann-Whitney statistic, ties counted half. */
    public static double rocAuc(float[] y, double[] p) {
        int n = p.length;
        Integer[] order = new Integer[n];
        for (int i = 0; i < n; i++) {
            order[i] = i;
        }
        Arrays.sort(order, (a, b) -> Double.compare(p[a], p[b]));
        double[] ranks = new double[n];
        int i = 0;
        while (i < n) {
            int j = i;
            while (j + 1 < n && p[order[j + 1]] == p[order[i]]) {
                j++;
            }
            double r = (i + j + 2) / 2.0;
            for (int k = i; k <= j; k++) {
                ranks[order[k]] = r;
            }
            i = j + 1;
        }
        double pos = 0;
        double sum = 0;
        for (int k = 0; k < n; k++) {
            if (y[k] == 1f) {
                pos++;
                sum += ranks[k];
            }
        }
        double neg = n - pos;
        return (sum - pos * (pos + 1) / 2) / (pos * neg);
    }

    /** Average precision over the distinct scores from the highest down. */
    public static double averagePrecision(float[] y, double[] p) {
        int n = p.length;
        Integer[] order = new Integer[n];
        for (int i = 0; i < n; i++) {
            order[i] = i;
        }
        Arrays.sort(order, (a, b) -> Double.compare(p[b], p[a]));
        double total = 0;
        for (float v : y) {
            total += v;
        }
        double tp = 0;
        double ap = 0;
        double prevRecall = 0;
        for (int k = 0; k < n; k++) {
            tp += y[order[k]];
            if (k + 1 < n && p[order[k + 1]] == p[order[k]]) {
                continue;
            }
            double recall = tp / total;
            ap += (recall - prevRecall) * (tp / (k + 1));
            prevRecall = recall;
        }
        return ap;
    }
}
