"""Host-framework integrations: one module per host (``fsdp``, ``deepspeed``, ...), imported on demand."""
