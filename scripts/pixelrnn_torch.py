"""PyTorch implementation of the PixelRNN `pipeline bench --model pixelrnn` compares against.

The same network as src/kernels/pixelrnn (binary pixels): a 7x7 mask-A convolution to 2h maps,
residual Row LSTM or Diagonal BiLSTM layers of h units (1x1 back to 2h, added to the input),
ReLU, 1x1, ReLU, 1x1 to a logit. Vectorized over the batch and the width (or the skewed
column's rows): only the rows (Row LSTM) or the skewed columns (Diagonal BiLSTM) are a Python
loop, as a user would write it. Times training steps (Adam) and scoring on random binary
images and prints one JSON object: torch, train_images_per_s, score_images_per_s (medians).

    python3 scripts/pixelrnn_torch.py --architecture row_lstm --threads 2

With --serve it times one pass per request instead, so that a caller can alternate its own
passes with these and both see the same machine: it prints {"torch": version} once warm, then
for each line "train" or "score" read from stdin one line {"images_per_s": rate}, until EOF.
"""

import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("torch is not installed (pip install torch)", file=sys.stderr)
    sys.exit(3)


class MaskedConv(nn.Conv2d):
    """A convolution whose taps at and after the centre (mask A) are zero."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2:] = 0
        mask[:, :, k // 2 + 1:, :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def lstm(z, c):
    h4 = z.shape[1] // 4
    o, f, i, g = torch.sigmoid(z[:, :h4]), torch.sigmoid(z[:, h4:2 * h4]), torch.sigmoid(z[:, 2 * h4:3 * h4]), torch.tanh(z[:, 3 * h4:])
    c = f * c + i * g
    return o * torch.tanh(c), c


class RowLstm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h
        # Mask B along the row: taps dx = -1, 0.
        self.input = nn.Conv2d(2 * h, 4 * h, (1, 2))
        self.state = nn.Conv1d(h, 4 * h, 3, padding=1, bias=False)

    def forward(self, x):
        b, _, height, width = x.shape
        zin = self.input(F.pad(x, (1, 0)))
        h = x.new_zeros(b, self.h, width)
        c = x.new_zeros(b, self.h, width)
        out = []
        for r in range(height):
            z = zin[:, :, r] + self.state(h)
            h, c = lstm(z, c)
            out.append(h)
        return torch.stack(out, 2)


def skew(x):
    b, ch, height, width = x.shape
    out = x.new_zeros(b, ch, height, width + height - 1)
    for r in range(height):
        out[:, :, r, r:r + width] = x[:, :, r]
    return out


def unskew(x, width):
    return torch.stack([x[:, :, r, r:r + width] for r in range(x.shape[2])], 2)


class DiagonalLstm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h
        self.input = nn.Conv2d(2 * h, 4 * h, 1)
        # Same row and the row above, in the previous skewed column.
        self.state = nn.Conv1d(h, 4 * h, 2, padding=0, bias=False)

    def forward(self, x):
        b, _, height, width = x.shape
        zin = self.input(skew(x))
        h = x.new_zeros(b, self.h, height)
        c = x.new_zeros(b, self.h, height)
        out = []
        for j in range(zin.shape[3]):
            z = zin[:, :, :, j] + self.state(F.pad(h, (1, 0)))
            h, c = lstm(z, c)
            out.append(h)
        return unskew(torch.stack(out, 3), width)


class DiagonalBiLstm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.forward_lstm = DiagonalLstm(h)
        self.backward_lstm = DiagonalLstm(h)

    def forward(self, x):
        f = self.forward_lstm(x)
        b = self.backward_lstm(x.flip(3)).flip(3)
        return f + F.pad(b, (0, 0, 1, 0))[:, :, :-1]


class PixelRnn(nn.Module):
    def __init__(self, architecture, layers, h):
        super().__init__()
        self.input = MaskedConv(1, 2 * h, 7)
        layer = RowLstm if architecture == "row_lstm" else DiagonalBiLstm
        self.layers = nn.ModuleList(layer(h) for _ in range(layers))
        self.outputs = nn.ModuleList(nn.Conv2d(h, 2 * h, 1) for _ in range(layers))
        self.head = nn.Conv2d(2 * h, 2 * h, 1)
        self.logit = nn.Conv2d(2 * h, 1, 1)

    def forward(self, x):
        y = self.input(x)
        for layer, out in zip(self.layers, self.outputs):
            y = y + out(layer(y))
        return self.logit(F.relu(self.head(F.relu(y))))


def rate(count, run):
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def median_rate(repeats, count, run):
    return statistics.median(rate(count, run) for _ in range(repeats))


def serve(count, passes):
    print(json.dumps({"torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what not in passes:
            print(f"unknown request {what!r}: expected one of {sorted(passes)}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps({"images_per_s": rate(count, passes[what])}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="row_lstm", choices=["row_lstm", "diagonal_bilstm"])
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--height", type=int, default=28)
    parser.add_argument("--width", type=int, default=28)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="time one pass per line of stdin")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PixelRnn(args.architecture, args.layers, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(args.batch * args.steps, 1, args.height, args.width) < 0.2).float()

    def train():
        for s in range(args.steps):
            batch = x[s * args.batch:(s + 1) * args.batch]
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(batch), batch, reduction="sum")
            loss.backward()
            optimizer.step()

    def score():
        with torch.no_grad():
            for s in range(args.steps):
                batch = x[s * args.batch:(s + 1) * args.batch]
                F.binary_cross_entropy_with_logits(model(batch), batch, reduction="none").sum((1, 2, 3))

    train()  # warm-up
    if args.serve:
        serve(args.batch * args.steps, {"train": train, "score": score})
        return
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "train_images_per_s": median_rate(args.repeats, args.batch * args.steps, train),
        "score_images_per_s": median_rate(args.repeats, args.batch * args.steps, score),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
