"""What every training script does around its step: the shared flags and their checks, the order of
the data, the model of a run (Run), saves and resumes, the one loop and its optimizer updates,
logging, and evaluation during training."""
