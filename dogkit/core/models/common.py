# ---------------------------------------------------------------------------------------------
# Model building blocks shared by the models
# ---------------------------------------------------------------------------------------------
import torch


def adam(module, lr, cfg, device):
    """Adam whose learning rate is a tensor on CUDA, so a captured CUDA graph sees schedule changes."""
    on_cuda = torch.device(device).type == "cuda"
    lr = torch.tensor(lr, device=device) if on_cuda else lr
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), capturable=on_cuda)
