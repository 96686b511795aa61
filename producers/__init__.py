"""Event producers that feed the gateway through its public ingress."""
