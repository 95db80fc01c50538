"""What a person looks at: W&B runs, result grids and plots. Imports the layers below (core to retrieval)."""
