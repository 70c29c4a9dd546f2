"""The real-time dialogue server (WebSocket, sessions, controller)."""
