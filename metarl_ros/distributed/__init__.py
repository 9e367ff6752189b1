"""Ray scale-out: training sweeps, parallel evaluation episodes, local or on a cluster."""
