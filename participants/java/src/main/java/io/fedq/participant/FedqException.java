package io.fedq.participant;

/** A one-line error with a reason: what the command prints before it exits non-zero. */
public class FedqException extends Exception {
    private static final long serialVersionUID = 1L;

    public FedqException(String message) {
        super(message);
    }

    public FedqException(String message, Throwable cause) {
        super(message, cause);
    }
}
