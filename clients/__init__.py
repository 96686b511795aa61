"""Programs that drive the gateway from outside, such as the fan-out benchmark."""
