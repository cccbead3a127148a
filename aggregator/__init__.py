"""The aggregator service: consumer loop, pure aggregation strategies, Redis model store."""
