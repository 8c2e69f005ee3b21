"""Errors raised by the billing package.

BillingError
├── UnbalancedTransaction   postings of a transaction do not sum to zero
├── DuplicateTransaction    a transaction id was already posted (idempotency key)
└── InsufficientFunds       a debit would take an account below its floor
"""


class BillingError(Exception):
    """Base of every error the billing package raises."""


class UnbalancedTransaction(BillingError):
    pass


class DuplicateTransaction(BillingError):
    pass


class InsufficientFunds(BillingError):
    pass
