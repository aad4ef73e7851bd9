"""What every other part of dpq stands on: errors, module selectors, the packaged config tree,
atomic file writes, devices and processes, small ``nn`` helpers. Imports nothing else of dpq."""
