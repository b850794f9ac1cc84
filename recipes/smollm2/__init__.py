"""SmolLM2-135M-Instruct on reasoning-gym tasks: see recipes/smollm2/README.md."""
