"""kvrag's HTTP server: FastAPI routes over ``kvstore.bank.BankStore``."""
