"""Convert the public MMWHS download to a semi-supervised nnU-Net raw dataset (see --help).

Same as the console script installed with the package; see nnunet_semi/conversion/mmwhs.py.
"""
from nnunet_semi.conversion.mmwhs import main

if __name__ == "__main__":
    main()
