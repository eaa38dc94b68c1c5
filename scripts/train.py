"""Same as `lrl-train`."""
from lrlightning.cli import train

if __name__ == "__main__":
    train()
