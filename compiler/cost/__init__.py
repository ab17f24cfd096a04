"""The cost model: device tables, measured profiles, and time and memory per subgraph."""
