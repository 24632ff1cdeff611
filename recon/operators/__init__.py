"""Forward operators: one module per modality, all on network-format (B, C, H, W) tensors."""
from recon.operators.base import LinearOperator, Operator, ScaledOperator, dot_product_test, inner, unit_norm
from recon.operators.ct import (FILTERS, LODOPAB_ATTENUATION, RayTransform, equispaced_angles, fbp_filter,
                                post_log_measurements)
from recon.operators.mri import (MultiCoilMRI, acs_region, birdcage_sensitivities, default_center_fraction,
                                 equispaced_mask, espirit_sensitivities, estimate_sensitivities, fft2c, ifft2c,
                                 make_mask, to_channels, to_complex, variable_density_mask)
from recon.operators.restoration import (Blur, Downsample, Identity, Mask, SaturatedBlur, box_mask,
                                         gaussian_kernel, lanczos2_kernel, motion_kernel, random_pixel_mask)

__all__ = [
    "Operator", "LinearOperator", "ScaledOperator", "unit_norm", "dot_product_test", "inner",
    "RayTransform", "equispaced_angles", "fbp_filter", "FILTERS", "post_log_measurements", "LODOPAB_ATTENUATION",
    "MultiCoilMRI", "fft2c", "ifft2c", "to_complex", "to_channels", "equispaced_mask", "variable_density_mask",
    "make_mask", "default_center_fraction", "acs_region", "birdcage_sensitivities", "estimate_sensitivities",
    "espirit_sensitivities",
    "Identity", "Mask", "Blur", "SaturatedBlur", "Downsample", "box_mask", "random_pixel_mask",
    "gaussian_kernel", "motion_kernel", "lanczos2_kernel",
]
