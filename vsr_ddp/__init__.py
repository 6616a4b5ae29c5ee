"""vsr_ddp: distributed batch jobs for AI video processing on torchrun and Slurm."""
__version__ = "0.1.0"
