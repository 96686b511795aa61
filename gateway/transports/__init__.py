"""Transports: how events leave the gateway (WebSocket push; polling and MQTT later)."""
