"""Convert the public PancreasCT download to a semi-supervised nnU-Net raw dataset (see --help).

Same as the console script installed with the package; see nnunet_semi/conversion/pancreas.py.
"""
from nnunet_semi.conversion.pancreas import main

if __name__ == "__main__":
    main()
