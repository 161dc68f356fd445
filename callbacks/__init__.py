"""Lightning callbacks: sample images, codebook health, throughput (with the world and eval work)."""
