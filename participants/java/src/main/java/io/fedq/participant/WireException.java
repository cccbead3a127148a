package io.fedq.participant;

/** A message that breaks the wire format: {@link #reason} is the refusal reason of wire-format section 10. */
public class WireException extends Exception {
    private static final long serialVersionUID = 1L;
    public final String reason;

    public WireException(String reason, String detail) {
        super(reason + ": " + detail);
        this.reason = reason;
    }
}
