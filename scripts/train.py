"""Same as `lrl-train`."""
from lrlightning.app.cli import train

if __name__ == "__main__":
    train()
