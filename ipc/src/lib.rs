//! Tessera's framed IPC protocol between its processes: handshake, messages, fd passing
