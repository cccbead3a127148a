package io.fedq.participant;

/** The feature encoding of docs/protocol.md section 5: a table to float32 rows and 0/1 labels. */
public final class Features {
    public final float[][] x;
    public final float[] y;

    private Features(float[][] x, float[] y) {
        this.x = x;
        this.y = y;
    }

    public int rows() {
        return y.length;
    }

    public static Features encode(Table t, Spec spec) throws FedqException {
        int[] cols = new int[spec.features.size()];
        for (int i = 0; i < cols.length; i++) {
            String name = spec.features.get(i).name;
            cols[i] = t.column(name);
            if (cols[i] < 0) {
                throw new FedqException("the table has no column " + name + " (a feature of the task spec)");
            }
        }
        int target = t.column(spec.targetName);
        if (target < 0) {
            throw new FedqException("the table has no column " + spec.targetName + " (the task's target)");
        }
        int dim = spec.inputDim();
        float[][] x = new float[t.rows][dim];
        float[] y = new float[t.rows];
        for (int r = 0; r < t.rows; r++) {
            int slot = 0;
            for (int i = 0; i < cols.length; i++) {
                Spec.Feature f = spec.features.get(i);
                if (f.numeric) {
                    double v = t.number(cols[i], r);
                    if (Double.isInfinite(v)) {
                        throw new FedqException("column " + f.name + " holds an infinite value (row " + (r + 1) + ")");
                    }
                    if (Double.isNaN(v)) {
                        v = f.fill != null ? f.fill : f.mean;
                    }
                    float z = (float) ((v - f.mean) / f.std);
                    if (!Float.isFinite(z)) {
                        throw new FedqException("column " + f.name + ": row " + (r + 1) + " does not scale to a finite float32");
                    }
                    x[r][slot++] = z;
                } else {
                    String cell = t.columns.get(cols[i])[r] == null ? null : t.canonical(cols[i], r);
                    int k = cell == null ? -1 : f.vocabulary.indexOf(cell);
                    x[r][slot + (k < 0 ? f.vocabulary.size() : k)] = 1.0f;
                    slot += f.vocabulary.size() + 1;
                }
            }
            if (t.columns.get(target)[r] == null) {
                throw new FedqException("the target " + spec.targetName + " is missing in row " + (r + 1));
            }
            String label = t.canonical(target, r);
            if (spec.targetPositive != null) {
                y[r] = label.equals(spec.targetPositive) ? 1f : 0f;
            } else if (label.equals("0") || label.equals("False")) {
                y[r] = 0f;
            } else if (label.equals("1") || label.equals("True")) {
                y[r] = 1f;
            } else {
                throw new FedqException("the target " + spec.targetName + " is '" + label + "' in row " + (r + 1)
                        + "; without target.positive it must be 0/1 or False/True");
            }
        }
        return new Features(x, y);
    }

    public Features subset(int[] idx) {
        float[][] sx = new float[idx.length][];
        float[] sy = new float[idx.length];
        for (int i = 0; i < idx.length; i++) {
            sx[i] = x[idx[i]];
            sy[i] = y[idx[i]];
        }
        return new Features(sx, sy);
    }
}
