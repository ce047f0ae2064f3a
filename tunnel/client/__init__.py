"""The client program: engine thread, runtime (sockets + core), config, headless."""
