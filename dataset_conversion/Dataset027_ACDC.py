from nnunet_semi.conversion.acdc import main

if __name__ == "__main__":
    main()
