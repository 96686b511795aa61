"""Transports: how events leave the gateway: WebSocket push, the MQTT bridge."""
