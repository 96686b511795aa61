"""Ingress: the HTTP publish API, health, readiness, metrics and admin reads."""
