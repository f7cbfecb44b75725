"""Small networks for FD001 windows [B, 30, 14] (already scaled)."""
from __future__ import annotations

import torch
from torch import nn

from data import RUL_CAP


class CNN(nn.Module):
    """1-D CNN over time: 3 conv layers, then a small dense head on the flattened feature map."""

    def __init__(self, c_in=14, width=16, hidden=32, window=30, k=5, dropout=0.2):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(c_in, width, k, padding=k // 2), nn.ReLU(),
            nn.Conv1d(width, width, k, padding=k // 2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(width * window, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, 1))

    def forward(self, x):               # x [B, T, C] -> [B, 1], in units of RUL_CAP
        return self.head(self.conv(x.transpose(1, 2)))


class PoolCNN(nn.Module):
    """1-D CNN with a pooled head (time-mean and last-step features) instead of a flattened one:
    far fewer head parameters, so it overfits less than CNN."""

    def __init__(self, c_in=14, width=16, hidden=32, k1=9, k2=5, dropout=0.2, last=8):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(c_in, width, k1, padding=k1 // 2), nn.ReLU(),
            nn.Conv1d(width, width, k2, padding=k2 // 2), nn.ReLU(),
        )
        self.last = last
        self.head = nn.Sequential(nn.Linear(2 * width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, 1))

    def forward(self, x):
        h = self.conv(x.transpose(1, 2))                    # [B, W, T]
        f = torch.cat([h.mean(dim=2), h[:, :, -self.last:].mean(dim=2)], dim=1)
        return self.head(f)


class GRUNet(nn.Module):
    def __init__(self, c_in=14, hidden=32, dropout=0.2):
        super().__init__()
        self.gru = nn.GRU(c_in, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(h[-1])


class MLP(nn.Module):
    def __init__(self, c_in=14, window=30, hidden=64, dropout=0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c_in * window, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


ARCHS = {"cnn": CNN, "pcnn": PoolCNN, "gru": GRUNet, "mlp": MLP}


def make(arch: str, **kw) -> nn.Module:
    return ARCHS[arch](**kw)


class Ensemble(nn.Module):
    """Exported graph: window [B,30,14] -> rul [B,1] (mean of members, cycles, in [0, cap]),
    rul_std [B,1] (population std of the clipped member predictions)."""

    def __init__(self, members, cap: float = RUL_CAP):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cap = cap

    def forward(self, window):
        p = torch.cat([m(window) for m in self.members], dim=1) * self.cap   # [B, M]
        p = torch.clamp(p, 0.0, self.cap)
        mean = p.mean(dim=1, keepdim=True)
        std = torch.sqrt(((p - mean) ** 2).mean(dim=1, keepdim=True))
        return mean, std


class AE(nn.Module):
    """Dense autoencoder on the flattened window; forward returns the reconstruction."""

    def __init__(self, c_in=14, window=30, hidden=64, code=8):
        super().__init__()
        d = c_in * window
        self.shape = (window, c_in)
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, code))
        self.dec = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, x):
        return self.dec(self.enc(x)).view(-1, *self.shape)


class AEScore(nn.Module):
    """Exported graph: window [B,30,14] -> score [B,1] = mean squared reconstruction error."""

    def __init__(self, ae: AE):
        super().__init__()
        self.ae = ae

    def forward(self, window):
        r = self.ae(window)
        return ((r - window) ** 2).mean(dim=(1, 2)).unsqueeze(1)


class FusedPoolCNN(nn.Module):
    """The same function as Ensemble([PoolCNN, ...]) with the members fused into wide layers
    (one conv, one grouped conv, two block-diagonal dense layers), so onnxruntime runs a few
    large kernels instead of many small ones. Built from trained members; exact up to float
    summation order."""

    def __init__(self, members, cap: float = RUL_CAP):
        super().__init__()
        m0 = members[0]
        M = len(members)
        c1, c2 = m0.conv[0], m0.conv[2]
        W = c1.out_channels
        H = m0.head[0].out_features
        self.M, self.W, self.last, self.cap = M, W, m0.last, cap
        self.conv1 = nn.Conv1d(c1.in_channels, M * W, c1.kernel_size[0], padding=c1.padding[0])
        self.conv2 = nn.Conv1d(M * W, M * W, c2.kernel_size[0], padding=c2.padding[0], groups=M)
        self.fc1 = nn.Linear(2 * M * W, M * H)
        self.fc2 = nn.Linear(M * H, M)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.cat([m.conv[0].weight for m in members]))
            self.conv1.bias.copy_(torch.cat([m.conv[0].bias for m in members]))
            self.conv2.weight.copy_(torch.cat([m.conv[2].weight for m in members]))
            self.conv2.bias.copy_(torch.cat([m.conv[2].bias for m in members]))
            self.fc1.weight.zero_()
            self.fc2.weight.zero_()
            for i, m in enumerate(members):
                w1 = m.head[0].weight                      # [H, 2W]: [mean features | last features]
                rows = slice(i * H, (i + 1) * H)
                self.fc1.weight[rows, i * W:(i + 1) * W] = w1[:, :W]
                self.fc1.weight[rows, M * W + i * W:M * W + (i + 1) * W] = w1[:, W:]
                self.fc1.bias[rows] = m.head[0].bias
                self.fc2.weight[i, i * H:(i + 1) * H] = m.head[3].weight[0]
                self.fc2.bias[i] = m.head[3].bias[0]

    def forward(self, window):
        h = torch.relu(self.conv2(torch.relu(self.conv1(window.transpose(1, 2)))))   # [B, M*W, T]
        f = torch.cat([h.mean(dim=2), h[:, :, -self.last:].mean(dim=2)], dim=1)       # [B, 2*M*W]
        p = self.fc2(torch.relu(self.fc1(f))) * self.cap                               # [B, M]
        p = torch.clamp(p, 0.0, self.cap)
        mean = p.mean(dim=1, keepdim=True)
        std = torch.sqrt(((p - mean) ** 2).mean(dim=1, keepdim=True))
        return mean, std
