"""The small core every stage may use: config, references, artifacts, model loading,
tracking, hardware, home and run. Nothing in here imports a stage."""
