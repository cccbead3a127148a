"""What the aggregator and the participant share: wire format, codecs, specs, errors."""
