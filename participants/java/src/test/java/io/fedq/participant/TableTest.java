package io.fedq.participant;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.junit.Test;

/** pandas-like reading (docs/protocol.md section 5.1) and the refusals of section 5.4. */
public class TableTest {
    @Test
    public void typesAreInferredPerColumnAndCanonicalised() throws Exception {
        Table t = Table.parse("a,b,c,d,e\n01,2.0,true,\"x, y\",1e-05\n2,2.5,False,NA,3\n");
        assertEquals(Table.Kind.INT, t.kinds.get(0));
        assertEquals("1", t.canonical(0, 0));
        assertEquals(Table.Kind.FLOAT, t.kinds.get(1));
        assertEquals("2", t.canonical(1, 0));
        assertEquals("2.5", t.canonical(1, 1));
        assertEquals(Table.Kind.BOOL, t.kinds.get(2));
        assertEquals("True", t.canonical(2, 0));
        assertEquals("x, y", t.canonical(3, 0));
        assertEquals(null, t.columns.get(3)[1]);
        assertEquals("1e-05", t.canonical(4, 0));
        Table mixed = Table.parse("a\n1.0\nabc\n");
        assertEquals("1.0", mixed.canonical(0, 0));
    }

    @Test
    public void badInputIsRefusedWithAReason() throws Exception {
        Spec s = ProtocolVectorsTest.spec();
        String[][] cases = {
            {"housing,age,default\nown,3,yes\n", "income"},
            {"housing,age,income,default\nown,3,abc,yes\nown,4,5,no\n", "not a number"},
            {"housing,age,income,default\nown,3,inf,yes\n", "infinite"},
            {"housing,age,income,default\nown,3,1e308,yes\n", "finite float32"},
            {"housing,age,income,default\nown,3,4,\n", "missing"},
            {"housing,age,income,income,default\n", "twice"},
        };
        for (String[] c : cases) {
            try {
                Features.encode(Table.parse(c[0]), s);
                fail("accepted: " + c[0]);
            } catch (FedqException e) {
                assertTrue(e.getMessage(), e.getMessage().contains(c[1]));
                assertTrue(!e.getMessage().contains("\n"));
            }
        }
    }

    @Test
    public void theSplitIsDeterministicAndDisjoint() {
        int[][] a = Participant.split(10, 0.25, 3);
        int[][] b = Participant.split(10, 0.25, 3);
        assertEquals(2, a[1].length); // round(2.5) = 2, half to even
        assertEquals(8, a[0].length);
        assertEquals(java.util.Arrays.toString(a[1]), java.util.Arrays.toString(b[1]));
        assertEquals(0, Participant.split(10, 0.0, 3)[1].length);
        assertEquals(1, Participant.split(2, 0.1, 3)[1].length);
    }

    @Test
    public void secureAggregationAndBankDpAreRefused() throws Exception {
        String base = Docs.block("protocol.md", "json protocol-vector:spec").trim();
        base = base.substring(0, base.length() - 1);
        Participant.Config cfg = new Participant.Config();
        cfg.participant = "bank-a";
        for (String extra : new String[] {
            ",\"secure_aggregation\":{\"threshold\":2}", ",\"privacy\":{\"record\":{\"epsilon_budget\":1}}"}) {
            Spec s = Spec.parse(base + extra + "}", "test");
            try {
                Participant.check(s, cfg);
                fail("accepted " + extra);
            } catch (FedqException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("does not support"));
            }
        }
    }
}
