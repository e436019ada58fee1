from nnunet_semi.conversion.hippocampus import main

if __name__ == "__main__":
    main()
