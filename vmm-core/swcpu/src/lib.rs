//! Tessera's software x86-64 CPU
