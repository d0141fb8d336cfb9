// SPDX-License-Identifier: GPL-2.0
/*
 * siov_adi: guest driver for siovmm's ADI functions (PCI 5356:0002), used by siovmm's
 * integration tests. It enables MSI-X, sets up the ADI's work queue in DMA memory, and on
 * request (sysfs "run") submits every opcode with a completion interrupt, checks each result,
 * checks that a descriptor pointing outside guest memory completes with an error, and checks
 * MSI-X masking: a masked completion vector raises nothing, shows in the PBA, and its interrupt
 * arrives once when unmasked. The verdict is in sysfs "result".
 *
 * IMS path: when siovmm's interface is present (CPUID 0x40000100) and the VM's policy allows
 * IMS (CPUID flags, SIOV ACPI table without IMS_OPT_OUT, no remapping unit with Caching Mode),
 * the driver allocates `ims_vectors` more vectors through IMS, beyond its 2 MSI-X vectors:
 * Linux IRQs from x86_vector_domain (the guest picks vector and CPU, as Hyper-V's PCI driver
 * does). In pv mode each is given to siovmm with the IMS_COMPOSE hypercall; in trap mode the
 * driver writes its own MSI message into the ADI's IMS window slot, which siovmm traps. When the
 * device keeps IMS in memory (CPUID flag IMS_IN_QUEUE), IMS_COMPOSE returns the host-composed
 * message and the driver stores it in its queue's IMS area (after the ring, named by the queue
 * context), where mask and pending live too; unmasking is committed with IMS_MASK.
 * "run" then also fires every IMS vector once and checks that handles it was not given raise
 * nothing. sysfs "mode" says "ims-pv", "ims-trap" or "msix".
 *
 * "abuse" turns the guest hostile against one ADI and then checks it works again (below).
 *
 * Register map and descriptor format: siovmm docs/siov-device.md; hypercalls:
 * docs/hypercall.md.
 */
#include <linux/acpi.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/irq.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <asm/hw_irq.h>
#include <asm/irqdomain.h>

static int ims_vectors = 256;
module_param(ims_vectors, int, 0444);
MODULE_PARM_DESC(ims_vectors, "IMS vectors per ADI when the VM allows IMS (0: MSI-X only)");
static int enlightened = 1;
module_param(enlightened, int, 0444);
MODULE_PARM_DESC(enlightened, "1: know siovmm's hypercall and opt in to IMS over the platform's hint; "
		 "0: obey the hint, as a driver that knows only the platform's IMS signals");
static int pba_check = 1;
module_param(pba_check, int, 0444);
MODULE_PARM_DESC(pba_check, "1: a masked vector's interrupt must show in the PBA; 0: skip that check, for a VMM "
		 "that reads a passed-through device's PBA from the device instead of emulating it (Cloud Hypervisor)");
static int poll_timeout_ms = 5000;
module_param(poll_timeout_ms, int, 0444);
MODULE_PARM_DESC(poll_timeout_ms, "how long a polled NOOP of the self-test may take before it counts as lost: 5 s. "
		 "The check is that every one completes; how fast is reported (roundtrip_ns, slowest_ns), since a "
		 "nested emulated CPU can stall a device thread for over 100 ms now and then");
/* Set once this guest has opted in (probes run one after another). */
static bool ims_opted_in;
/* The hypercall's CPUID flags. */
static u32 hc_flags;

#define HC_SIG_LEAF 0x40000100
#define HC_INFO_LEAF 0x40000101
#define HC_IMS_ALLOWED 1
#define HC_IMS_TRAP 2
#define HC_IMS_IN_QUEUE 4
#define IMS_WINDOW 0x4000
#define IMS_CTRL_MASK 1
#define IMS_CTRL_PENDING 2
#define IMS_CTRL_BACKED 4
enum ims_mode { IMS_NONE, IMS_PV, IMS_TRAP };
#define HC_QUERY 0
#define HC_IMS_ALLOC 1
#define HC_IMS_FREE 2
#define HC_IMS_COMPOSE 3
#define HC_IMS_MASK 4
#define HC_IMS_OPT_IN 5
#define HC_NOT_ALLOWED (-6)
#define HC_NO_SUCH_ADI (-3)
#define MSIX_VECTORS 2

#define ADI_VENDOR 0x5356
#define ADI_DEVICE 0x0002

#define REG_VERSION 0x00
#define REG_CAPS 0x04
#define REG_QBASE_LO 0x08
#define REG_QBASE_HI 0x0c
#define REG_QSIZE 0x10
#define REG_CONTROL 0x14
#define REG_STATUS 0x18
#define REG_DOORBELL 0x1000
#define REG_PBA 0x3000

#define OP_NOOP 0x00
#define OP_MEMMOVE 0x03
#define OP_FILL 0x04
#define OP_COMPARE 0x05
#define OP_CRC32C 0x10

#define F_CRAV 0x4
#define F_RCR 0x8
#define F_RCI 0x10

#define ST_SUCCESS 0x01
#define ST_FALSE_PRED 0x02
#define ST_PAGE_FAULT 0x03

#define QSIZE 16
/* The queue's IMS area (in-memory IMS): after the ring, named at context offsets 8 and 16. */
#define IMS_AREA_OFF (64 + QSIZE * 64)
#define IMS_AREA_ENTRIES 512
#define CTX_SIZE (IMS_AREA_OFF + IMS_AREA_ENTRIES * 16)
#define BUF_SIZE (4 * 4096)
#define CQ_VECTOR 1

struct adi_desc {
	u32 pasid;
	u32 flags_op;
	u64 completion;
	u64 src;
	u64 dst;
	u32 size;
	u16 int_handle;
	u16 rsvd;
	u32 crc_seed;
	u8 op_specific[20];
} __packed;

struct adi_comp {
	u8 status;
	u8 result;
	u16 rsvd;
	u32 bytes_completed;
	u64 fault_addr;
	u32 crc;
	u8 rest[12];
} __packed;

struct adi;

struct ims_vec {
	struct adi *a;
	int irq;
	u16 handle;
	atomic_t count;
	struct completion done;
};

struct adi {
	struct pci_dev *pdev;
	u64 *hc_block;
	void __iomem *hc_reg;
	int n_ims;
	enum ims_mode ims_mode;
	bool in_queue;
	u32 ims_first;
	struct ims_vec *ims;
	void __iomem *bar;
	u8 *ctx;
	dma_addr_t ctx_dma;
	u8 *buf;
	dma_addr_t buf_dma;
	struct adi_comp *comp;
	dma_addr_t comp_dma;
	u32 tail;
	int cq_irq;
	atomic_t irqs;
	struct completion done;
	struct mutex lock;
	char result[320];
};

static irqreturn_t adi_cq_irq(int irq, void *data)
{
	struct adi *a = data;

	atomic_inc(&a->irqs);
	complete(&a->done);
	return IRQ_HANDLED;
}

static irqreturn_t adi_misc_irq(int irq, void *data)
{
	return IRQ_HANDLED;
}

static u32 crc32c_sw(u32 crc, const u8 *p, size_t n)
{
	int k;

	crc = ~crc;
	while (n--) {
		crc ^= *p++;
		for (k = 0; k < 8; k++)
			crc = (crc & 1) ? (crc >> 1) ^ 0x82f63b78 : crc >> 1;
	}
	return ~crc;
}

/*
 * Queues one descriptor naming interrupt handle `handle` and rings the doorbell; returns the
 * nanoseconds the doorbell write took.
 */
static u64 adi_submit_h(struct adi *a, u8 op, u32 flags, u64 src, u64 dst, u32 size, u32 seed, u16 handle)
{
	u64 t0;

	struct adi_desc *d = (struct adi_desc *)(a->ctx + 64 + (a->tail % QSIZE) * 64);

	memset(a->comp, 0, sizeof(*a->comp));
	memset(d, 0, sizeof(*d));
	d->flags_op = ((u32)op << 24) | flags | F_CRAV | F_RCR;
	d->completion = a->comp_dma;
	d->src = src;
	d->dst = dst;
	d->size = size;
	d->int_handle = handle;
	d->crc_seed = seed;
	a->tail++;
	dma_wmb();
	WRITE_ONCE(*(u32 *)a->ctx, a->tail);
	wmb();
	t0 = ktime_get_ns();
	writel(1, a->bar + REG_DOORBELL);
	return ktime_get_ns() - t0;
}

/* Enables the ADI's queue on a cleared context; whether the device took it. */
static bool adi_queue_enable(struct adi *a)
{
	memset(a->ctx, 0, CTX_SIZE);
	a->tail = 0;
	writel(lower_32_bits(a->ctx_dma), a->bar + REG_QBASE_LO);
	writel(upper_32_bits(a->ctx_dma), a->bar + REG_QBASE_HI);
	writel(QSIZE, a->bar + REG_QSIZE);
	writel(1, a->bar + REG_CONTROL);
	return readl(a->bar + REG_STATUS) & 1;
}

static u64 adi_submit(struct adi *a, u8 op, u32 flags, u64 src, u64 dst, u32 size, u32 seed)
{
	return adi_submit_h(a, op, flags, src, dst, size, seed, CQ_VECTOR);
}

/*
 * Waits for the completion record, up to 5 s of guest time like the interrupt waits: the
 * device's workers are host threads, which a loaded host (or a nested sandbox under load) may
 * leave unscheduled for well over the 0.5-1 s a count of 5000 short sleeps used to allow.
 */
static int adi_poll(struct adi *a)
{
	unsigned long deadline = jiffies + 5 * HZ;

	do {
		if (READ_ONCE(a->comp->status))
			return 0;
		usleep_range(100, 200);
	} while (time_before(jiffies, deadline));
	return READ_ONCE(a->comp->status) ? 0 : -ETIMEDOUT;
}

/* Submits with a completion interrupt and waits for the interrupt. */
static int adi_run_one(struct adi *a, u8 op, u64 src, u64 dst, u32 size, u32 seed)
{
	reinit_completion(&a->done);
	adi_submit(a, op, F_RCI, src, dst, size, seed);
	if (!wait_for_completion_timeout(&a->done, 5 * HZ))
		return -ETIMEDOUT;
	dma_rmb();
	return READ_ONCE(a->comp->status) ? 0 : -EIO;
}

#define FAIL(...) do { snprintf(a->result, sizeof(a->result), "FAIL " __VA_ARGS__); return; } while (0)

static bool pba_pending(struct adi *a)
{
	return readl(a->bar + REG_PBA) & (1u << CQ_VECTOR);
}

static irqreturn_t adi_ims_irq(int irq, void *data)
{
	struct ims_vec *v = data;

	atomic_inc(&v->count);
	complete(&v->done);
	return IRQ_HANDLED;
}

static u16 adi_rid(struct adi *a)
{
	return (a->pdev->bus->number << 8) | a->pdev->devfn;
}

/* One synchronous hypercall: the 64-bit store of the block's address exits to siovmm. */
static long adi_hypercall(struct adi *a, u64 nr, u64 a1, u64 a2, u64 a3, u64 a4, u64 *result)
{
	u64 *b = a->hc_block;

	memset(b, 0, 64);
	b[0] = nr;
	b[1] = a1;
	b[2] = a2;
	b[3] = a3;
	b[4] = a4;
	writeq(virt_to_phys(b), a->hc_reg);
	if (result)
		*result = READ_ONCE(b[7]);
	return (long)READ_ONCE(b[6]);
}

/* Whether and how this VM lets the guest use IMS, and where the hypercall register is. */
static enum ims_mode adi_ims_allowed(u64 *reg)
{
	enum ims_mode mode;
	unsigned int eax, ebx, ecx, edx;
	struct acpi_table_header *t;
	bool ok = true;

	cpuid(HC_SIG_LEAF, &eax, &ebx, &ecx, &edx);
	if (ebx != 0x766f6953 || ecx != 0x79486d6d || edx != 0x6c614370) /* "SiovmmHypCal" */
		return IMS_NONE;
	cpuid(HC_INFO_LEAF, &eax, &ebx, &ecx, &edx);
	hc_flags = ebx;
	mode = (ebx & HC_IMS_ALLOWED) ? IMS_PV : (ebx & HC_IMS_TRAP) ? IMS_TRAP : IMS_NONE;
	if (mode == IMS_NONE)
		return IMS_NONE;
	*reg = ecx | ((u64)edx << 32);
	/* The SIOV table's IMS_OPT_OUT; no table means opted out. */
	if (ACPI_FAILURE(acpi_get_table("SIOV", 0, &t)))
		return IMS_NONE;
	if (t->length < 40 || (*(u32 *)((u8 *)t + 36) & 1))
		ok = false;
	acpi_put_table(t);
	/* A remapping unit reporting Caching Mode also means "no IMS". */
	if (ok && ACPI_SUCCESS(acpi_get_table(ACPI_SIG_DMAR, 0, &t))) {
		u32 off = 48;

		while (ok && off + 16 <= t->length) {
			u16 type = *(u16 *)((u8 *)t + off), len = *(u16 *)((u8 *)t + off + 2);
			void __iomem *regs;

			if (len < 4)
				break;
			if (type == 0) {
				regs = ioremap(*(u64 *)((u8 *)t + off + 8), 0x1000);
				if (!regs || (readq(regs + 8) & (1ULL << 7)))
					ok = false;
				if (regs)
					iounmap(regs);
			}
			off += len;
		}
		acpi_put_table(t);
	}
	pr_info("siov_adi: platform hint: %s\n", ok ? "IMS allowed" : "no IMS");
	/*
	 * The hint is "no IMS" for every guest: a driver that knows only the platform's signals
	 * stops here. One that knows siovmm's hypercall opts in over it (adi_ims_opt_in).
	 */
	if (!enlightened)
		return ok ? mode : IMS_NONE;
	return mode;
}

/*
 * Opts this guest in to IMS, once. Before that, siovmm must refuse IMS calls: checked first,
 * since that gate is what keeps a guest that never asked from using IMS.
 */
static int adi_ims_opt_in(struct adi *a)
{
	u64 flags;
	long st;

	if (ims_opted_in)
		return 0;
	st = adi_hypercall(a, HC_IMS_ALLOC, adi_rid(a), 1, 0, 0, NULL);
	if (st != HC_NOT_ALLOWED) {
		dev_err(&a->pdev->dev, "IMS_ALLOC answered %ld before the opt-in (error: IMS open to guests that never asked)\n", st);
		return -EPERM;
	}
	st = adi_hypercall(a, HC_IMS_OPT_IN, 0, 0, 0, 0, &flags);
	if (st)
		return -EPERM;
	dev_info(&a->pdev->dev, "opted in to IMS over the platform hint (flags %#llx)\n", flags);
	ims_opted_in = true;
	return 0;
}

static void __iomem *adi_slot(struct adi *a, int i)
{
	return a->bar + IMS_WINDOW + i * 16;
}

/* Entry n of the queue's in-memory IMS area: {addr_lo, addr_hi, data, ctrl}. */
static u32 *adi_qentry(struct adi *a, u32 n)
{
	return (u32 *)(a->ctx + IMS_AREA_OFF + n * 16);
}

/* Stores a host-composed message (IMS_COMPOSE's result) in entry n, masked. */
static void adi_qentry_store(struct adi *a, u32 n, u64 message)
{
	u32 *e = adi_qentry(a, n);

	WRITE_ONCE(e[3], IMS_CTRL_MASK);
	WRITE_ONCE(e[0], lower_32_bits(message));
	WRITE_ONCE(e[1], 0);
	WRITE_ONCE(e[2], upper_32_bits(message));
	dma_wmb();
}

/* Allocates n IMS vectors: Linux IRQs from the vector domain, composed through siovmm. */
static int adi_ims_setup(struct adi *a, int n)
{
	struct irq_alloc_info info;
	u64 first, handle;
	int i, err;
	long st;

	if (a->ims_mode == IMS_PV) {
		st = adi_hypercall(a, HC_IMS_ALLOC, adi_rid(a), n, 0, 0, &first);
		if (st)
			return -EIO;
		a->ims_first = first;
		a->in_queue = hc_flags & HC_IMS_IN_QUEUE;
		if (a->in_queue) {
			/* Name the IMS area in the queue context; the device reads it on each interrupt. */
			if (first + n > IMS_AREA_ENTRIES)
				return -ENOSPC;
			memset(a->ctx + IMS_AREA_OFF, 0, IMS_AREA_ENTRIES * 16);
			WRITE_ONCE(*(u64 *)(a->ctx + 8), a->ctx_dma + IMS_AREA_OFF);
			WRITE_ONCE(*(u32 *)(a->ctx + 16), IMS_AREA_ENTRIES);
			dma_wmb();
		}
	} else {
		first = 0;
	}
	a->ims = devm_kcalloc(&a->pdev->dev, n, sizeof(*a->ims), GFP_KERNEL);
	if (!a->ims)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		struct ims_vec *v = &a->ims[i];
		struct irq_cfg *cfg;

		memset(&info, 0, sizeof(info));
		v->a = a;
		init_completion(&v->done);
		v->irq = __irq_domain_alloc_irqs(x86_vector_domain, -1, 1, NUMA_NO_NODE, &info, false, NULL);
		if (v->irq < 0)
			return v->irq;
		__irq_set_handler(v->irq, handle_edge_irq, 0, "edge");
		err = request_irq(v->irq, adi_ims_irq, 0, "siov_adi-ims", v);
		if (err) {
			irq_dispose_mapping(v->irq);
			v->irq = 0;
			return err;
		}
		a->n_ims = i + 1;
		cfg = irqd_cfg(irq_get_irq_data(v->irq));
		if (a->ims_mode == IMS_PV) {
			u64 message;

			st = adi_hypercall(a, HC_IMS_COMPOSE, adi_rid(a), first + i, cfg->vector, cfg->dest_apicid,
					   &message);
			if (st)
				return -EIO;
			/* In queue memory the guest stores what the host composed, masked until committed. */
			if (a->in_queue)
				adi_qentry_store(a, first + i, message);
			if (adi_hypercall(a, HC_IMS_MASK, adi_rid(a), first + i, 0, 0, NULL))
				return -EIO;
			handle = MSIX_VECTORS + first + i;
		} else {
			/* Our own message: fixed delivery, physical destination (SDM Vol. 3 §11.11). */
			u32 ctrl;

			writel(0xfee00000 | ((cfg->dest_apicid & 0xff) << 12), adi_slot(a, i));
			writel(0, adi_slot(a, i) + 4);
			writel(cfg->vector, adi_slot(a, i) + 8);
			writel(0, adi_slot(a, i) + 12);
			ctrl = readl(adi_slot(a, i) + 12);
			if (!(ctrl & IMS_CTRL_BACKED))
				return -ENOSPC;
			handle = ctrl >> 16;
		}
		v->handle = handle;
	}
	return 0;
}

static void adi_ims_teardown(struct adi *a)
{
	int i;

	for (i = 0; i < a->n_ims; i++) {
		if (a->ims_mode == IMS_TRAP)
			writel(IMS_CTRL_MASK, adi_slot(a, i) + 12);
		free_irq(a->ims[i].irq, &a->ims[i]);
		irq_dispose_mapping(a->ims[i].irq);
	}
	if (a->n_ims && a->ims_mode == IMS_PV)
		adi_hypercall(a, HC_IMS_FREE, adi_rid(a), a->ims_first, 0, 0, NULL);
	a->n_ims = 0;
}

static int adi_total_ims(struct adi *a)
{
	int i, sum = 0;

	for (i = 0; i < a->n_ims; i++)
		sum += atomic_read(&a->ims[i].count);
	return sum;
}

/*
 * In-memory IMS: mask and pending live in the queue's memory, and only a message the host
 * composed delivers. Entry 0 is vector 0's. Delivers two interrupts: the commit's, and the
 * restored host message's.
 */
static const char *adi_ims_queue_selftest(struct adi *a, int before_ims, int before_cq)
{
	struct ims_vec *v = &a->ims[0];
	u32 *e = adi_qentry(a, a->ims_first);
	u32 saved[3] = { e[0], e[1], e[2] };
	struct irq_cfg *cfg = irqd_cfg(irq_get_irq_data(v->irq));

	/* Masked by a plain store (no exit): the device marks it pending there, raises nothing. */
	WRITE_ONCE(e[3], IMS_CTRL_MASK);
	dma_wmb();
	reinit_completion(&v->done);
	adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, v->handle);
	if (adi_poll(a))
		return "in-queue masked: descriptor never completed";
	msleep(20);
	dma_rmb();
	if (adi_total_ims(a) != before_ims)
		return "a masked in-queue IMS entry raised an interrupt";
	if (READ_ONCE(e[3]) != (IMS_CTRL_MASK | IMS_CTRL_PENDING))
		return "masked in-queue IMS entry not marked pending in queue memory";
	/* The commit: unmask through the host, which delivers the pending interrupt once. */
	if (adi_hypercall(a, HC_IMS_MASK, adi_rid(a), a->ims_first, 0, 0, NULL))
		return "IMS_MASK commit failed";
	if (!wait_for_completion_timeout(&v->done, 2 * HZ))
		return "pending in-queue interrupt not delivered on unmask";
	msleep(20);
	if (adi_total_ims(a) != before_ims + 1 || READ_ONCE(e[3]) != 0)
		return "unmasking an in-queue entry delivered the wrong interrupts";
	/* The guest's own message in place of the host's: remapping refuses it. */
	WRITE_ONCE(e[0], 0xfee00000 | ((cfg->dest_apicid & 0xff) << 12));
	WRITE_ONCE(e[2], cfg->vector);
	dma_wmb();
	adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, v->handle);
	if (adi_poll(a) || a->comp->status != ST_SUCCESS)
		return "descriptor on a forged in-queue entry failed";
	msleep(50);
	if (adi_total_ims(a) != before_ims + 1 || atomic_read(&a->irqs) != before_cq)
		return "a message the host did not compose raised an interrupt";
	e[0] = saved[0];
	e[1] = saved[1];
	e[2] = saved[2];
	dma_wmb();
	reinit_completion(&v->done);
	adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, v->handle);
	if (!wait_for_completion_timeout(&v->done, 2 * HZ))
		return "the restored host message did not deliver";
	if (adi_poll(a))
		return "descriptor after restore never completed";
	return NULL;
}

/* Fires every IMS vector once; checks that handles never given raise nothing. */
static const char *adi_ims_selftest(struct adi *a)
{
	int i, before_ims, before_cq;
	u64 spare;

	for (i = 0; i < a->n_ims; i++) {
		struct ims_vec *v = &a->ims[i];
		int c = atomic_read(&v->count);

		reinit_completion(&v->done);
		adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, v->handle);
		if (!wait_for_completion_timeout(&v->done, 2 * HZ))
			return "an IMS vector's interrupt did not arrive";
		if (adi_poll(a) || a->comp->status != ST_SUCCESS)
			return "IMS descriptor failed";
		if (atomic_read(&v->count) != c + 1)
			return "an IMS vector fired more than once";
	}
	before_ims = adi_total_ims(a);
	before_cq = atomic_read(&a->irqs);
	/* A handle never given: the device refuses it. */
	adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, 0xffff);
	if (adi_poll(a) || a->comp->status != 0x19)
		return "a handle never given was accepted";
	if (a->ims_mode == IMS_TRAP) {
		struct ims_vec *v = &a->ims[0];

		/* A message naming no vCPU of this VM is not backed. */
		writel(0xfee00000 | (200 << 12), adi_slot(a, a->n_ims));
		writel(0x40, adi_slot(a, a->n_ims) + 8);
		writel(0, adi_slot(a, a->n_ims) + 12);
		if (readl(adi_slot(a, a->n_ims) + 12) & IMS_CTRL_BACKED)
			return "a message for another APIC was backed";
		/* Masked slot: nothing raised, pending set; unmask delivers it once. */
		writel(IMS_CTRL_MASK, adi_slot(a, 0) + 12);
		reinit_completion(&v->done);
		adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, v->handle);
		if (adi_poll(a))
			return "masked IMS: descriptor never completed";
		msleep(20);
		if (adi_total_ims(a) != before_ims)
			return "a masked IMS slot raised an interrupt";
		if (!(readl(adi_slot(a, 0) + 12) & IMS_CTRL_PENDING))
			return "masked IMS slot not pending";
		writel(0, adi_slot(a, 0) + 12);
		if (!wait_for_completion_timeout(&v->done, 2 * HZ))
			return "pending IMS interrupt not delivered on unmask";
		msleep(20);
		if (adi_total_ims(a) != before_ims + 1 || atomic_read(&a->irqs) != before_cq)
			return "unmasking an IMS slot delivered the wrong interrupts";
		return NULL;
	}
	if (a->in_queue) {
		const char *why = adi_ims_queue_selftest(a, before_ims, before_cq);

		if (why)
			return why;
		before_ims += 2;
	}
	/* pv mode: the window is inert; a raw message written there raises nothing. */
	writel(0xfee00000, adi_slot(a, 0));
	writel(0x40, adi_slot(a, 0) + 8);
	writel(0, adi_slot(a, 0) + 12);
	if (readl(adi_slot(a, 0) + 12) != 0 || readl(adi_slot(a, 0)) != 0)
		return "the IMS window took a raw message in pv mode";
	/* A slot allocated but never composed: nothing programmed it, so it raises nothing. */
	if (adi_hypercall(a, HC_IMS_ALLOC, adi_rid(a), 1, 0, 0, &spare))
		return "IMS_ALLOC of a spare slot failed";
	adi_submit_h(a, OP_NOOP, F_RCI, 0, 0, 0, 0, MSIX_VECTORS + spare);
	if (adi_poll(a) || a->comp->status != ST_SUCCESS)
		return "descriptor on an uncomposed slot failed";
	msleep(50);
	adi_hypercall(a, HC_IMS_FREE, adi_rid(a), spare, 0, 0, NULL);
	if (adi_total_ims(a) != before_ims || atomic_read(&a->irqs) != before_cq)
		return "an interrupt the guest was not given arrived";
	/* Hypercalls naming an ADI that is not this VM's fail. */
	if (adi_hypercall(a, HC_IMS_ALLOC, 0x00ff, 1, 0, 0, NULL) != HC_NO_SUCH_ADI)
		return "IMS_ALLOC for an unassigned ADI was accepted";
	return NULL;
}

static void adi_selftest(struct adi *a)
{
	u8 *src = a->buf, *dst = a->buf + 4096, *tmp = a->buf + 8192;
	u64 s = a->buf_dma, d = a->buf_dma + 4096, t = a->buf_dma + 8192;
	int before = atomic_read(&a->irqs), i, irqs;
	static const u8 check[] = "123456789";

	for (i = 0; i < 4096; i++)
		src[i] = (u8)(i * 7 + 3);
	memset(dst, 0, 4096);

	if (adi_run_one(a, OP_NOOP, 0, 0, 0, 0) || a->comp->status != ST_SUCCESS)
		FAIL("noop status %#x", a->comp->status);
	if (adi_run_one(a, OP_MEMMOVE, s, d, 4096, 0) || a->comp->status != ST_SUCCESS)
		FAIL("memmove status %#x", a->comp->status);
	if (memcmp(src, dst, 4096))
		FAIL("memmove data");
	if (adi_run_one(a, OP_COMPARE, s, d, 4096, 0) || a->comp->status != ST_SUCCESS)
		FAIL("compare-equal status %#x", a->comp->status);
	dst[100] ^= 0xff;
	if (adi_run_one(a, OP_COMPARE, s, d, 4096, 0) || a->comp->status != ST_FALSE_PRED ||
	    a->comp->bytes_completed != 100)
		FAIL("compare-differ status %#x at %u", a->comp->status, a->comp->bytes_completed);
	if (adi_run_one(a, OP_FILL, 0x0123456789abcdefULL, t, 4096, 0) || a->comp->status != ST_SUCCESS)
		FAIL("fill status %#x", a->comp->status);
	for (i = 0; i < 4096; i++)
		if (tmp[i] != (u8)(0x0123456789abcdefULL >> ((i % 8) * 8)))
			FAIL("fill data at %d", i);
	memcpy(tmp, check, 9);
	if (adi_run_one(a, OP_CRC32C, t, 0, 9, 0) || a->comp->status != ST_SUCCESS ||
	    a->comp->crc != 0xe3069283 || a->comp->crc != crc32c_sw(0, check, 9))
		FAIL("crc32c status %#x value %#x", a->comp->status, a->comp->crc);
	/* Outside guest memory: completes with an error status, harms nothing. */
	if (adi_run_one(a, OP_MEMMOVE, 0x7ffffffff000ULL, d, 64, 0) || a->comp->status != ST_PAGE_FAULT)
		FAIL("out-of-range status %#x", a->comp->status);
	irqs = atomic_read(&a->irqs) - before;
	if (irqs != 7)
		FAIL("%d completion interrupts for 7 descriptors", irqs);

	/* Masked vector: nothing raised, pending in the PBA, delivered once on unmask. */
	irq_set_status_flags(a->cq_irq, IRQ_DISABLE_UNLAZY);
	disable_irq(a->cq_irq);
	reinit_completion(&a->done);
	before = atomic_read(&a->irqs);
	adi_submit(a, OP_NOOP, F_RCI, 0, 0, 0, 0);
	if (adi_poll(a)) {
		enable_irq(a->cq_irq);
		FAIL("masked: descriptor never completed");
	}
	msleep(20);
	if (atomic_read(&a->irqs) != before) {
		enable_irq(a->cq_irq);
		FAIL("masked vector raised an interrupt");
	}
	if (pba_check && !pba_pending(a)) {
		enable_irq(a->cq_irq);
		FAIL("masked: PBA bit not set");
	}
	enable_irq(a->cq_irq);
	if (!wait_for_completion_timeout(&a->done, 5 * HZ))
		FAIL("pending interrupt not delivered on unmask");
	msleep(20);
	if (atomic_read(&a->irqs) != before + 1)
		FAIL("unmask delivered %d interrupts", atomic_read(&a->irqs) - before);
	if (pba_check && pba_pending(a))
		FAIL("PBA bit still set after delivery");
	/* Submission cost: the doorbell write alone, and doorbell to completion record (polled). */
	{
		u64 bell = 0, round = 0, slowest = 0, t0, took;
		int n;

		for (n = 0; n < 100; n++) {
			t0 = ktime_get_ns();
			bell += adi_submit(a, OP_NOOP, 0, 0, 0, 0, 0);
			while (!READ_ONCE(a->comp->status)) {
				if (ktime_get_ns() - t0 > (u64)poll_timeout_ms * NSEC_PER_MSEC)
					FAIL("polled NOOP %d did not complete in %d ms", n, poll_timeout_ms);
				cpu_relax();
			}
			took = ktime_get_ns() - t0;
			round += took;
			slowest = max(slowest, took);
		}
		if (a->n_ims) {
			const char *why = adi_ims_selftest(a);

			if (why)
				FAIL("ims: %s", why);
		}
		snprintf(a->result, sizeof(a->result), "PASS irqs=%d ims=%d doorbell_ns=%llu roundtrip_ns=%llu slowest_ns=%llu",
			 atomic_read(&a->irqs), adi_total_ims(a), bell / 100, round / 100, slowest);
	}
}

/* Resets the ADI and enables its queue again (adi_queue_enable). */
static bool adi_queue_reset(struct adi *a)
{
	writel(2, a->bar + REG_CONTROL);
	return adi_queue_enable(a);
}

/*
 * Hostile mode (sysfs "abuse", tests/tests/hostile.rs): this guest attacks siovmm and the
 * device through one ADI — every config byte, BAR moves onto the other ADI, RAM, ECAM, the
 * interrupt controllers and the top of the address space, every BAR0 register, MSI-X entry,
 * PBA and IMS window dword, random descriptors (unknown opcodes, any flags, zero, huge and
 * over-limit sizes, addresses outside this guest's memory, tails past the ring), a doorbell
 * flood and a hypercall flood — then restores the function, resets the ADI, sets it up again
 * and runs the self-test. Writing "SEED LAST" (LAST: hex, the last byte of this guest's RAM, as
 * the last "System RAM" line of /proc/iomem ends) starts it; "result" then reads "PASS-HOSTILE <counts>" or "FAIL <what>".
 *
 * What a hostile guest could only do to itself is left out, so that it lives to show its ADI
 * works again: device writes (destinations, completion records, queue bases) go to this
 * driver's scratch memory or outside the guest's RAM, never to the rest of its RAM; MSI
 * messages it programs (MSI-X, IMS window, IMS_COMPOSE) carry device vectors, 0x21-0xeb but
 * 0x80, with fixed or lowest-priority delivery: below 0x20 are its exception handlers, from
 * 0xec Linux's system vectors (0xf8 is the reboot IPI, which stops the CPU), 0x80 the int80
 * system-call gate, and INIT, SMI and NMI delivery would stop its own CPU. Every such message
 * still reaches siovmm and is routed in this VM only.
 */
#define SCRATCH_ORDER 9 /* 2 MiB: room for a 1 MiB transfer at any offset of its first half */
#define SCRATCH_SIZE (PAGE_SIZE << SCRATCH_ORDER)
#define MAX_ADIS 256
#define HOSTILE_ALLOCS 512

static struct adi *all_adis[MAX_ADIS];
static int n_adis;

struct hostile {
	struct adi *a;
	u64 rng, ram_end;
	u8 *scratch;
	dma_addr_t scratch_dma;
	u64 *hc_block; /* 128 bytes: a misaligned block the VMM wrongly took would stay inside */
	void __iomem *hc_reg;
	u64 hc_reg_phys;
	u64 allocs[HOSTILE_ALLOCS];
	int n_allocs;
	unsigned long config_writes, bar_moves, mmio_writes, descriptors, doorbells, hypercalls, faults;
};

static u64 rnd(struct hostile *h)
{
	/* xorshift64* (Marsaglia; Vigna's multiplier): reproducible from the seed. */
	h->rng ^= h->rng >> 12;
	h->rng ^= h->rng << 25;
	h->rng ^= h->rng >> 27;
	return h->rng * 0x2545f4914f6cdd1dULL;
}

/* An address for the device to write: this driver's scratch memory, or outside guest RAM. */
static u64 hostile_dst(struct hostile *h)
{
	u64 v;

	switch (rnd(h) % 6) {
	case 0:
	case 1:
		return h->scratch_dma + rnd(h) % (SCRATCH_SIZE / 2);
	case 2:
		return h->ram_end + rnd(h) % (1ULL << 32);
	case 3:
		return -(rnd(h) % 8192); /* wraps past 2^64 */
	case 4:
		return (rnd(h) & 1) ? 0xfee00000 + rnd(h) % 4096 : 0xfec00000 + rnd(h) % 4096;
	default:
		v = rnd(h);
		return v < h->ram_end ? h->scratch_dma + v % (SCRATCH_SIZE / 2) : v;
	}
}

/* An address for the device to read: anything, including RAM and across its end. */
static u64 hostile_src(struct hostile *h)
{
	switch (rnd(h) % 4) {
	case 0:
		return rnd(h) % h->ram_end;
	case 1:
		return h->ram_end - rnd(h) % 4096;
	default:
		return hostile_dst(h);
	}
}

static u32 hostile_size(struct hostile *h)
{
	switch (rnd(h) % 8) {
	case 0:
		return 0;
	case 1:
		return 0xffffffff;
	case 2:
		return (1 << 20) + 1;
	case 3:
		return 1 << 20;
	default:
		return rnd(h) % 8192;
	}
}

/* A vector the guest may aim at itself: see the comment above. */
static u32 hostile_vector(struct hostile *h)
{
	u32 v = 0x21 + rnd(h) % (0xec - 0x21);

	return v == 0x80 ? 0x81 : v;
}

/* An MSI message (address, data) the guest may aim at itself. */
static void hostile_msi(struct hostile *h, u32 *addr_lo, u32 *addr_hi, u32 *data)
{
	*addr_lo = (rnd(h) & 1) ? 0xfee00000 | (rnd(h) & 0xffffc) : (u32)rnd(h);
	*addr_hi = (rnd(h) % 4) ? 0 : (u32)rnd(h);
	*data = hostile_vector(h) | ((rnd(h) & 1) << 8) | ((u32)rnd(h) & 0xffff0000) | (rnd(h) & 0xc000);
}

static void hostile_write(struct hostile *h, u32 off, u32 value, int width)
{
	void __iomem *p = h->a->bar + off;

	if (width == 1)
		writeb(value, p);
	else if (width == 2)
		writew(value, p);
	else
		writel(value, p);
	h->mmio_writes++;
}

/* Every dword of BAR0: registers, doorbell page, MSI-X table and PBA, IMS window. */
static void hostile_registers(struct hostile *h)
{
	u32 off, lo, hi, data;

	for (off = 0; off < 0x8000; off += 4) {
		if (off == REG_QBASE_HI) {
			/* A random high half keeps the queue outside this guest's RAM. */
			hostile_write(h, off, (u32)rnd(h) | 1, 4);
		} else if ((off >= 0x2000 && off < 0x2000 + 16 * MSIX_VECTORS) || off >= IMS_WINDOW) {
			if (off % 16 == 0) {
				hostile_msi(h, &lo, &hi, &data);
				hostile_write(h, off, lo, 4);
				hostile_write(h, off + 4, hi, 4);
				hostile_write(h, off + 8, data, 4);
				hostile_write(h, off + 12, (u32)rnd(h), 4);
			}
		} else {
			hostile_write(h, off, (u32)rnd(h), 4);
		}
		if (off % 64 == 0)
			readl(h->a->bar + (rnd(h) % 0x8000 & ~3u));
	}
	/* Narrow and unaligned accesses anywhere in the register page and the PBA. */
	for (off = 0; off < 2000; off++) {
		u32 at = (rnd(h) & 1) ? rnd(h) % 0x40 : 0x3000 + rnd(h) % 0x100;

		switch (rnd(h) % 3) {
		case 0:
			hostile_write(h, at, (u32)rnd(h), 1);
			break;
		case 1:
			hostile_write(h, at & ~1u, (u32)rnd(h), 2);
			break;
		default:
			/* The high half of QUEUE_BASE stays nonzero: the queue outside this guest's RAM. */
			writeq(rnd(h) | (1ULL << 40), h->a->bar + (at & ~7u));
			h->mmio_writes++;
		}
	}
}

/* Random descriptors in 64 batches, each ring written whole and the tail moved anywhere. */
static void hostile_descriptors(struct hostile *h)
{
	struct adi *a = h->a;
	int batch, i;
	unsigned long deadline;
	bool bogus;

	adi_queue_reset(a);
	for (batch = 0; batch < 64; batch++) {
		for (i = 0; i < QSIZE; i++) {
			struct adi_desc *d = (struct adi_desc *)(a->ctx + 64 + i * 64);
			u8 op = (rnd(h) % 3) ? (u8[]){ OP_NOOP, OP_MEMMOVE, OP_FILL, OP_COMPARE, OP_CRC32C }[rnd(h) % 5] : (u8)rnd(h);
			u32 flags = (rnd(h) % 3) ? (F_CRAV | F_RCR | ((rnd(h) & 1) ? F_RCI : 0)) : ((u32)rnd(h) & 0xffffff);

			d->pasid = (u32)rnd(h);
			d->flags_op = ((u32)op << 24) | flags;
			d->completion = (rnd(h) % 3) ? a->comp_dma : hostile_dst(h);
			d->src = (op == OP_MEMMOVE || op == OP_CRC32C || op == OP_COMPARE) ? hostile_src(h) : rnd(h);
			d->dst = (op == OP_COMPARE) ? hostile_src(h) : hostile_dst(h);
			d->size = hostile_size(h);
			d->int_handle = (rnd(h) % 3) ? rnd(h) % 8 : (u16)rnd(h);
			d->crc_seed = (u32)rnd(h);
			h->descriptors++;
		}
		bogus = false;
		switch (rnd(h) % 8) {
		case 0:
			a->tail += QSIZE + 1 + rnd(h) % 100000; /* past the ring: a queue error */
			bogus = true;
			break;
		case 1:
			a->tail -= 1 + rnd(h) % 32; /* behind the head */
			bogus = true;
			break;
		default:
			a->tail += 1 + rnd(h) % QSIZE;
		}
		dma_wmb();
		WRITE_ONCE(*(u32 *)a->ctx, a->tail);
		wmb();
		writel(1, a->bar + REG_DOORBELL);
		h->doorbells++;
		/* Until the device caught up, at most 2 s (20 ms for a tail it must refuse). */
		deadline = jiffies + (bogus ? HZ / 50 : 2 * HZ);
		while (READ_ONCE(*(u32 *)(a->ctx + 4)) != a->tail && time_before(jiffies, deadline))
			usleep_range(200, 400);
		/* Go on from wherever the device stopped. */
		a->tail = READ_ONCE(*(u32 *)(a->ctx + 4));
	}
}

/* Submits one descriptor on a fresh queue and waits for its record; the status, or -1. */
static int hostile_one(struct adi *a, u8 op, u64 src, u64 dst, u32 size)
{
	adi_queue_reset(a);
	adi_submit(a, op, 0, src, dst, size, 0);
	return adi_poll(a) ? -1 : a->comp->status;
}

/*
 * Descriptors that name memory outside this guest: each must complete with a page fault and
 * move nothing (the canary page of scratch memory unchanged).
 */
static const char *hostile_outside(struct hostile *h)
{
	struct adi *a = h->a;
	u8 *canary = h->scratch + SCRATCH_SIZE - 4096;
	u64 canary_dma = h->scratch_dma + SCRATCH_SIZE - 4096;
	static const struct { u8 op; int src_out, dst_out; u64 off; u32 size; u8 status; const char *what; } cases[] = {
		{ OP_MEMMOVE, 1, 0, 0, 4096, ST_PAGE_FAULT, "memmove from just past RAM" },
		{ OP_MEMMOVE, 1, 0, -64, 128, ST_PAGE_FAULT, "memmove from across the end of RAM" },
		{ OP_MEMMOVE, 0, 1, 0, 4096, ST_PAGE_FAULT, "memmove to just past RAM" },
		{ OP_FILL, 0, 2, 0, 8192, ST_PAGE_FAULT, "fill across the top of the address space" },
		{ OP_MEMMOVE, 0, 0, 0, 0, 0x13, "zero-size memmove" },
		{ OP_MEMMOVE, 0, 0, 0, (1 << 20) + 1, 0x13, "memmove over 1 MiB" },
		{ 0x7f, 0, 0, 0, 64, 0x10, "unknown opcode" },
	};
	int i, st;

	for (i = 0; i < ARRAY_SIZE(cases); i++) {
		u64 src = cases[i].src_out ? h->ram_end + cases[i].off : h->scratch_dma;
		u64 dst = cases[i].dst_out == 1 ? h->ram_end : cases[i].dst_out == 2 ? -4096ULL : canary_dma;

		memset(canary, 0x5a, 4096);
		st = hostile_one(a, cases[i].op, src, dst, cases[i].size);
		if (st != cases[i].status) {
			snprintf(a->result, sizeof(a->result), "FAIL hostile: %s completed with status %d, not %#x",
				 cases[i].what, st, cases[i].status);
			return a->result;
		}
		if (memchr_inv(canary, 0x5a, 4096)) {
			snprintf(a->result, sizeof(a->result), "FAIL hostile: %s changed guest memory", cases[i].what);
			return a->result;
		}
		h->faults++;
	}
	return NULL;
}

static void hostile_doorbell_flood(struct hostile *h, int n)
{
	int i;

	/* Mostly the doorbell itself (KVM's ioeventfd), the rest anywhere in its page (siovmm). */
	for (i = 0; i < n; i++)
		writel((u32)rnd(h), h->a->bar + REG_DOORBELL + ((rnd(h) % 4) ? 0 : (rnd(h) % 1024) * 4));
	h->doorbells += n;
}

/* Hypercalls with any number, arguments and ADI, and block addresses anywhere outside RAM. */
static void hostile_hypercalls(struct hostile *h, int n)
{
	/*
	 * Its own ADI, and names that are no ADI of this VM (the host bridge, unused functions,
	 * anything): never a sibling ADI, whose IMS slots the guest may legitimately free.
	 */
	u16 rids[] = { adi_rid(h->a), 0, 0x00ff, 0xffff, 0 };
	int i, k, j;

	if (!h->hc_reg)
		return;
	for (i = 0; i < n; i++) {
		u64 *b = h->hc_block, nr = (rnd(h) % 4) ? rnd(h) % 7 : rnd(h);

		memset(b, 0, 64);
		b[0] = nr;
		rids[ARRAY_SIZE(rids) - 1] = (u16)rnd(h);
		for (j = 0; j < n_adis; j++)
			if (all_adis[j] != h->a && adi_rid(all_adis[j]) == rids[ARRAY_SIZE(rids) - 1])
				rids[ARRAY_SIZE(rids) - 1] = 0xffff;
		b[1] = rids[rnd(h) % ARRAY_SIZE(rids)];
		for (k = 2; k <= 5; k++)
			b[k] = (rnd(h) % 2) ? rnd(h) % 4096 : (rnd(h) % 2) ? rnd(h) : 0;
		/* COMPOSE's vector: one the guest may aim at itself, or one siovmm must refuse. */
		if (nr == HC_IMS_COMPOSE)
			b[3] = (rnd(h) % 4) ? hostile_vector(h) : (rnd(h) & 1) ? rnd(h) % 32 : 256 + rnd(h) % 100000;
		switch (rnd(h) % 8) {
		case 0:
			writeq(virt_to_phys(b) + 1 + rnd(h) % 7, h->hc_reg); /* misaligned */
			break;
		case 1:
			writeq(h->ram_end + rnd(h) % (1ULL << 32), h->hc_reg);
			break;
		case 2:
			writeq(-(rnd(h) % 64) - 8, h->hc_reg);
			break;
		default:
			writeq(virt_to_phys(b), h->hc_reg);
			/* Keep what IMS_ALLOC gave, to give it back before the reset. */
			if (nr == HC_IMS_ALLOC && b[6] == 0 && h->n_allocs < HOSTILE_ALLOCS)
				h->allocs[h->n_allocs++] = b[7];
		}
		h->hypercalls++;
	}
}

/* One well-formed hypercall through this run's block; its status. */
static long hostile_hc(struct hostile *h, u64 nr, u64 a1, u64 a2)
{
	u64 *b = h->hc_block;

	memset(b, 0, 64);
	b[0] = nr;
	b[1] = a1;
	b[2] = a2;
	b[6] = 0x5a5a;
	writeq(virt_to_phys(b), h->hc_reg);
	return (long)READ_ONCE(b[6]);
}

/* The ECAM base from MCFG (0 if none). */
static u64 ecam_base(void)
{
	struct acpi_table_header *t;
	u64 base = 0;

	if (ACPI_SUCCESS(acpi_get_table("MCFG", 0, &t))) {
		if (t->length >= 52)
			base = *(u64 *)((u8 *)t + 44);
		acpi_put_table(t);
	}
	return base;
}

static void hostile_place_bar(struct hostile *h, u64 at)
{
	struct pci_dev *pdev = h->a->pdev;

	pci_write_config_word(pdev, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
	pci_write_config_dword(pdev, PCI_BASE_ADDRESS_0, lower_32_bits(at));
	pci_write_config_dword(pdev, PCI_BASE_ADDRESS_1, upper_32_bits(at));
	h->bar_moves++;
	h->config_writes += 3;
}

/*
 * BAR0 onto the other ADIs' BARs, this guest's RAM, ECAM, the hypercall register, the
 * interrupt controllers, address 0 and the top of the address space (where base + size
 * wraps). After each: this guest's RAM still reads back what it holds, config space still
 * answers, and every other ADI's registers still answer at their own place.
 */
static const char *hostile_bars(struct hostile *h)
{
	struct adi *a = h->a;
	u64 targets[16];
	int n = 0, i, j;
	u16 host_vendor, vendor;

	/* The first eight other ADIs' BARs, then the rest. */
	for (i = 0; i < n_adis && n < 8; i++)
		if (all_adis[i] != a)
			targets[n++] = pci_resource_start(all_adis[i]->pdev, 0);
	targets[n++] = h->scratch_dma;
	targets[n++] = ecam_base();
	targets[n++] = h->hc_reg_phys & ~0x7fffULL;
	targets[n++] = 0xfee00000;
	targets[n++] = 0xfec00000;
	targets[n++] = 0;
	targets[n++] = -0x8000ULL;
	pci_bus_read_config_word(a->pdev->bus, 0, PCI_VENDOR_ID, &host_vendor);
	for (i = 0; i < n; i++) {
		hostile_place_bar(h, targets[i]);
		memset(h->scratch, 0xa5, 4096);
		if (memchr_inv(h->scratch, 0xa5, 4096)) {
			snprintf(a->result, sizeof(a->result), "FAIL hostile: RAM under a BAR moved to %#llx is not RAM", targets[i]);
			return a->result;
		}
		pci_read_config_word(a->pdev, PCI_VENDOR_ID, &vendor);
		if (vendor != ADI_VENDOR) {
			snprintf(a->result, sizeof(a->result), "FAIL hostile: config space lost with BAR0 at %#llx", targets[i]);
			return a->result;
		}
		if (h->hc_reg && hostile_hc(h, HC_QUERY, 0, 0) != 0) {
			snprintf(a->result, sizeof(a->result), "FAIL hostile: the hypercall stopped answering with BAR0 at %#llx",
				 targets[i]);
			return a->result;
		}
		for (j = 0; j < n_adis; j++) {
			if (all_adis[j] != a && readl(all_adis[j]->bar + REG_VERSION) != 0x00010000) {
				snprintf(a->result, sizeof(a->result), "FAIL hostile: another ADI's registers gone with BAR0 at %#llx",
					 targets[i]);
				return a->result;
			}
		}
		/* Somewhere free again before the next target, toggling decode on the way. */
		pci_write_config_word(a->pdev, PCI_COMMAND, 0);
		hostile_place_bar(h, pci_resource_start(a->pdev, 0));
	}
	pci_bus_read_config_word(a->pdev->bus, 0, PCI_VENDOR_ID, &vendor);
	if (vendor != host_vendor) {
		snprintf(a->result, sizeof(a->result), "FAIL hostile: the host bridge's config space changed (%#x, was %#x)",
			 vendor, host_vendor);
		return a->result;
	}
	return NULL;
}

/* Every byte of the 4 KiB config space, then random widths and places (BARs included). */
static void hostile_config(struct hostile *h)
{
	struct pci_dev *pdev = h->a->pdev;
	int off, i;

	for (off = 0; off < 4096; off++)
		pci_write_config_byte(pdev, off, (u8)rnd(h));
	for (i = 0; i < 2000; i++) {
		off = rnd(h) % 4096;
		if (rnd(h) & 1)
			pci_write_config_dword(pdev, off & ~3, (u32)rnd(h));
		else
			pci_write_config_word(pdev, off & ~1, (u16)rnd(h));
	}
	h->config_writes += 4096 + 2000;
}

/* The function as Linux set it up, the ADI reset, its queue and IMS vectors set up again. */
static const char *hostile_recover(struct hostile *h)
{
	struct adi *a = h->a;
	int i, err;

	pci_restore_state(a->pdev);
	pci_save_state(a->pdev);
	for (i = 0; i < h->n_allocs; i++)
		hostile_hc(h, HC_IMS_FREE, adi_rid(a), h->allocs[i]);
	adi_ims_teardown(a);
	if (!adi_queue_reset(a))
		return "FAIL hostile: the queue did not enable after the reset";
	if (a->ims_mode != IMS_NONE && ims_vectors > 0) {
		err = adi_ims_setup(a, ims_vectors);
		if (err) {
			adi_ims_teardown(a);
			snprintf(a->result, sizeof(a->result), "FAIL hostile: IMS setup after the reset failed (%d)", err);
			return a->result;
		}
	}
	return NULL;
}

/* Milliseconds since *t into *ms; *t moves on. */
static void lap(u64 *t, u64 *ms)
{
	u64 now = ktime_get_ns();

	*ms = (now - *t) / NSEC_PER_MSEC;
	*t = now;
}

static void adi_abuse(struct adi *a, u64 seed, u64 ram_end)
{
	struct hostile *h;
	struct page *page;
	unsigned int eax, ebx, ecx, edx;
	const char *why = NULL, *recovered;
	u64 t, ms[7] = { 0 };

	h = kzalloc(sizeof(*h), GFP_KERNEL);
	page = alloc_pages(GFP_KERNEL | __GFP_ZERO, SCRATCH_ORDER);
	if (h)
		h->hc_block = kzalloc(128, GFP_KERNEL);
	if (!h || !page || !h->hc_block) {
		if (h)
			kfree(h->hc_block);
		kfree(h);
		if (page)
			__free_pages(page, SCRATCH_ORDER);
		strscpy(a->result, "FAIL hostile: no memory", sizeof(a->result));
		return;
	}
	h->a = a;
	h->rng = seed | 1;
	h->ram_end = ram_end;
	h->scratch = page_address(page);
	h->scratch_dma = page_to_phys(page);
	/* The hypercall register, wherever CPUID says (whether or not this VM allows IMS). */
	cpuid(HC_SIG_LEAF, &eax, &ebx, &ecx, &edx);
	if (ebx == 0x766f6953 && ecx == 0x79486d6d && edx == 0x6c614370) {
		cpuid(HC_INFO_LEAF, &eax, &ebx, &ecx, &edx);
		h->hc_reg_phys = ecx | ((u64)edx << 32);
		h->hc_reg = ioremap(h->hc_reg_phys, 8);
		if (!h->hc_reg)
			why = "FAIL hostile: cannot map the hypercall register";
	}
	pci_save_state(a->pdev);
	pr_info("siov_adi %s: hostile run, seed %llu\n", pci_name(a->pdev), seed);
	/* Milliseconds per phase: registers, descriptors, outside, doorbells, hypercalls, config, BARs. */
	t = ktime_get_ns();
	if (!why) {
		hostile_registers(h);
		lap(&t, &ms[0]);
		hostile_descriptors(h);
		lap(&t, &ms[1]);
		why = hostile_outside(h);
		lap(&t, &ms[2]);
	}
	if (!why) {
		hostile_doorbell_flood(h, 10000);
		lap(&t, &ms[3]);
		hostile_hypercalls(h, 5000);
		lap(&t, &ms[4]);
		hostile_config(h);
		lap(&t, &ms[5]);
		why = hostile_bars(h);
		lap(&t, &ms[6]);
	}
	recovered = hostile_recover(h);
	why = why ? why : recovered;
	if (!why) {
		adi_selftest(a);
		if (!strncmp(a->result, "PASS ", 5)) {
			char self[sizeof(a->result)];

			strscpy(self, a->result + 5, sizeof(self));
			snprintf(a->result, sizeof(a->result),
				 "PASS-HOSTILE config=%lu bars=%lu mmio=%lu desc=%lu bells=%lu hcalls=%lu outside=%lu "
				 "ms=%llu/%llu/%llu/%llu/%llu/%llu/%llu; after reset: %s",
				 h->config_writes, h->bar_moves, h->mmio_writes, h->descriptors, h->doorbells, h->hypercalls,
				 h->faults, ms[0], ms[1], ms[2], ms[3], ms[4], ms[5], ms[6], self);
		}
	} else if (why != a->result) {
		strscpy(a->result, why, sizeof(a->result));
	}
	if (h->hc_reg)
		iounmap(h->hc_reg);
	kfree(h->hc_block);
	__free_pages(page, SCRATCH_ORDER);
	kfree(h);
}

static ssize_t abuse_store(struct device *dev, struct device_attribute *attr, const char *buf, size_t count)
{
	struct adi *a = pci_get_drvdata(to_pci_dev(dev));
	u64 seed, last;

	if (sscanf(buf, "%llu %llx", &seed, &last) != 2 || last < SZ_16M || last == U64_MAX)
		return -EINVAL;
	mutex_lock(&a->lock);
	adi_abuse(a, seed, last + 1);
	mutex_unlock(&a->lock);
	return count;
}
static DEVICE_ATTR_WO(abuse);

static ssize_t run_store(struct device *dev, struct device_attribute *attr, const char *buf, size_t count)
{
	struct adi *a = pci_get_drvdata(to_pci_dev(dev));

	mutex_lock(&a->lock);
	adi_selftest(a);
	mutex_unlock(&a->lock);
	return count;
}
static DEVICE_ATTR_WO(run);

static ssize_t result_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct adi *a = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%s\n", a->result);
}
static DEVICE_ATTR_RO(result);

static ssize_t mode_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct adi *a = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%s %d\n", !a->n_ims ? "msix" : a->ims_mode == IMS_TRAP ? "ims-trap" :
			  a->in_queue ? "ims-pv-queue" : "ims-pv", a->n_ims);
}
static DEVICE_ATTR_RO(mode);

static struct attribute *adi_attrs[] = { &dev_attr_run.attr, &dev_attr_result.attr, &dev_attr_mode.attr,
					 &dev_attr_abuse.attr, NULL };
ATTRIBUTE_GROUPS(adi);

static int adi_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct adi *a;
	int err;

	a = devm_kzalloc(&pdev->dev, sizeof(*a), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	a->pdev = pdev;
	mutex_init(&a->lock);
	init_completion(&a->done);
	strscpy(a->result, "not run", sizeof(a->result));
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), "siov_adi");
	if (err)
		return err;
	a->bar = pcim_iomap_table(pdev)[0];
	pci_set_master(pdev);
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (err)
		return err;
	a->ctx = dmam_alloc_coherent(&pdev->dev, CTX_SIZE, &a->ctx_dma, GFP_KERNEL);
	a->buf = dmam_alloc_coherent(&pdev->dev, BUF_SIZE, &a->buf_dma, GFP_KERNEL);
	if (!a->ctx || !a->buf)
		return -ENOMEM;
	a->comp = (struct adi_comp *)(a->buf + 3 * 4096);
	a->comp_dma = a->buf_dma + 3 * 4096;
	err = pci_alloc_irq_vectors(pdev, 2, 2, PCI_IRQ_MSIX);
	if (err < 0)
		return err;
	a->cq_irq = pci_irq_vector(pdev, CQ_VECTOR);
	err = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, 0), adi_misc_irq, 0, "siov_adi-misc", a);
	if (!err)
		err = devm_request_irq(&pdev->dev, a->cq_irq, adi_cq_irq, 0, "siov_adi-cq", a);
	if (err)
		goto free_vectors;
	if (!adi_queue_enable(a)) {
		dev_err(&pdev->dev, "queue enable failed, status %#x\n", readl(a->bar + REG_STATUS));
		err = -EIO;
		goto free_vectors;
	}
	pci_set_drvdata(pdev, a);
	if (ims_vectors > 0) {
		u64 reg;

		a->ims_mode = adi_ims_allowed(&reg);
		if (a->ims_mode != IMS_NONE) {
			a->hc_reg = devm_ioremap(&pdev->dev, reg, 8);
			a->hc_block = devm_kzalloc(&pdev->dev, 64, GFP_KERNEL);
			err = (a->hc_reg && a->hc_block) ? adi_ims_opt_in(a) : -ENOMEM;
			if (!err)
				err = adi_ims_setup(a, ims_vectors);
			if (err) {
				dev_err(&pdev->dev, "IMS setup failed (%d), using MSI-X only\n", err);
				adi_ims_teardown(a);
			}
		} else {
			dev_info(&pdev->dev, "IMS not allowed in this VM, using MSI-X\n");
		}
	}
	if (n_adis < MAX_ADIS)
		all_adis[n_adis++] = a;
	dev_info(&pdev->dev, "ADI version %#x, caps %#x, MSI-X ready, %d IMS vectors\n",
		 readl(a->bar + REG_VERSION), readl(a->bar + REG_CAPS), a->n_ims);
	return 0;

free_vectors:
	pci_free_irq_vectors(pdev);
	return err;
}

static void adi_remove(struct pci_dev *pdev)
{
	struct adi *a = pci_get_drvdata(pdev);
	int i;

	for (i = 0; i < n_adis; i++)
		if (all_adis[i] == a)
			all_adis[i] = all_adis[--n_adis];
	adi_ims_teardown(a);
	writel(2, a->bar + REG_CONTROL);
	devm_free_irq(&pdev->dev, a->cq_irq, a);
	devm_free_irq(&pdev->dev, pci_irq_vector(pdev, 0), a);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id adi_ids[] = {
	{ PCI_DEVICE(ADI_VENDOR, ADI_DEVICE) },
	{}
};
MODULE_DEVICE_TABLE(pci, adi_ids);

static struct pci_driver adi_driver = {
	.name = "siov_adi",
	.id_table = adi_ids,
	.probe = adi_probe,
	.remove = adi_remove,
	.dev_groups = adi_groups,
};
module_pci_driver(adi_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("siovmm ADI test driver");
