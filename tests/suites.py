"""Source of the small suites that the pytester tests run in subprocesses."""

# A conftest for the inner runs: a small conv net trained on scikit-learn's digits, once per inner session.
DIGITS_CONFTEST = '''
import pytest, torch
from torch import nn
from sklearn.datasets import load_digits

@pytest.fixture(scope="session")
def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]

@pytest.fixture(scope="session")
def model(digits):
    x, y = digits
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.set_num_threads(1)  # float training differs with the thread count; xdist workers use fewer
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 64, 10))
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[:1200]), y[:1200]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return net.eval()

@pytest.fixture(scope="session")
def val_data(digits):
    x, y = digits
    return x[1200:1500], y[1200:1500]
'''
