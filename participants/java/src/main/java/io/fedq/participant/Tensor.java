package io.fedq.participant;

import java.util.Arrays;

/** One named float32 tensor (the only dtype of a task model, docs/protocol.md section 6). */
public final class Tensor {
    public final String name;
    public final long[] shape;
    public final float[] data;

    public Tensor(String name, long[] shape, float[] data) {
        this.name = name;
        this.shape = shape.clone();
        this.data = data;
        if (numel(shape) != data.length) {
            throw new IllegalArgumentException("tensor " + name + ": shape " + Arrays.toString(shape)
                    + " needs " + numel(shape) + " values, got " + data.length);
        }
    }

    public static long numel(long[] shape) {
        long n = 1;
        for (long d : shape) {
            n *= d;
        }
        return n;
    }

    public Tensor withData(float[] d) {
        return new Tensor(name, shape, d);
    }
}
