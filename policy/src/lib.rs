//! Sandbox profiles for each Tessera process kind, as data, and the code that applies them
