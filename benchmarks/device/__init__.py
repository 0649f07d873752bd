"""GPU checks and the session script that measures the GPU figures (`make bench-gpu`)."""
