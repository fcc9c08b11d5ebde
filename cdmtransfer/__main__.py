from cdmtransfer.cli import main

main()
