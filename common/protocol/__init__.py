"""The migration protocol as pure state machines: frames and clock ticks in, frames out."""
