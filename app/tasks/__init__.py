"""Task transports: JSON and SSE over HTTP, and the WebSocket."""
