"""klein-ray: batch rendering of FLUX.2 [klein] manifests on Ray into S3-compatible storage."""

__version__ = "0.1.0"
