"""Training scripts shipped with fedgrid, so that a job can be built from the installed package alone.

Each is a plain site-side script, PyTorch plus `fedclient.api`. A recipe copies one into the job
(`FedAvgRecipe(train_script=FASHION_MNIST_TRAIN)`), or a job names it as a module the sites have
installed (`{"script": "module:fedgrid.examples.fashion_mnist_train"}` in its client.json).
"""

from pathlib import Path

FASHION_MNIST_TRAIN = Path(__file__).with_name("fashion_mnist_train.py")
"""FedAvg on a Fashion-MNIST split made by `fedgrid data` (options: --data_root, --model, --epochs, ...)."""
