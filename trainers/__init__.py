# This folder is what nnUNet_extTrainer points at (print it with `nnUNetv2_semi_env`).
# nnU-Net imports the modules in it as top-level modules and then drops them from sys.modules,
# so they only re-export classes whose code lives in the installed package `nnunet_semi`.
