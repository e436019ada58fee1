from nnunet_semi.conversion.la import main

if __name__ == "__main__":
    main()
