"""The ground floor: user-facing errors, atomic files and where a run executes (device,
precision, seeding, torchrun). It imports nothing of the project's own."""
