"""The lowest layer: errors and exit codes, durable files and locks, processes and collectives, log lines, mixed
precision, and the configuration (the typed schemas and the engine that turns them into flags and YAML).
Imports nothing else of ``ranking``."""
